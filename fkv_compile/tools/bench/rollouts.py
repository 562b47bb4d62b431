"""The rollout level of ``fkv bench``: whole videos per mode, each mode compiled in a process of its own (its peak RSS
its own), the processes taking turns one video each (:func:`alternating_rollouts`), with a profiled video last for
the attention share and the top ops. ``python -m fkv_compile.tools.bench`` is a mode's process (``__main__.py``)."""

from __future__ import annotations

import contextlib
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from ...plan import STATIC
from .settings import GEOMETRIES, BenchSettings, check_modes
from .timing import Clock, median_seconds

__all__ = ["ModeRollouts", "alternating_rollouts", "serve", "in_fresh_process", "peak_rss", "clone_seconds_per_chunk"]


ATTENTION_OPS = ("fkv::select_attention", "fkv::store_attention", "fkv::oracle_attention")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    """This process's peak resident bytes: the high-water mark of its own address space (``VmHWM``).
    ``ru_maxrss`` is not that: Linux carries the parent's RSS at fork across ``exec`` into it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _attention_seconds(prof: torch.profiler.profile) -> float:
    """Time in attention: top-level SDPA calls and the fkv ops (not their children twice)."""
    total = 0.0
    for e in prof.events():
        name = e.name
        if not (name in ATTENTION_OPS or "scaled_dot_product" in name):
            continue
        parent = e.cpu_parent
        while parent is not None and not (parent.name in ATTENTION_OPS or "scaled_dot_product" in parent.name):
            parent = parent.cpu_parent
        if parent is None:
            total += (e.device_time_total if e.device_time_total else e.cpu_time_total) / 1e6
    return total


def _top_ops(prof: torch.profiler.profile, seconds: float, count: int = 8) -> list[dict[str, Any]]:
    """The ``count`` ops with the most self time over the profiled video (device time on GPUs), with their share."""
    rows = []
    for e in prof.key_averages():
        self_us = e.self_device_time_total if e.self_device_time_total else e.self_cpu_time_total
        name = "Inductor kernels (one compiled graph)" if e.key.startswith("## Call CompiledFxGraph") else e.key
        rows.append({"op": name, "self_s": self_us / 1e6, "calls": e.count})
    rows.sort(key=lambda r: -r["self_s"])
    return [{**r, "share": r["self_s"] / seconds if seconds else math.nan} for r in rows[:count]]


class ModeRollouts:
    """One mode's compiled miniature at one geometry: a warm-up video (the compile) when made, timed videos on
    request, and last a profiled one (:meth:`summary`). Run it in a process of its own for its own peak RSS."""

    def __init__(self, s: BenchSettings, mode: str):
        from ...models import build, make_inputs, new_caches

        self.settings, self.mode, self.cfg = s, mode, s.config()
        self.device, self.dtype = torch.device(s.device), getattr(torch, s.dtype)
        model = build(self.cfg, dtype=self.dtype).to(self.device)
        self.inputs = make_inputs(self.cfg, chunks=GEOMETRIES[s.geometry].chunks, dtype=self.dtype, device=self.device)
        self.plan = s.head_plan(self.cfg)
        if mode == "dense":
            self.compiled = torch.compile(model, backend=s.lowering)
        else:
            self.compiled = torch.compile(model, backend="forcing_kv",
                                          options={"plan": self.plan, "mode": mode, "lowering": s.lowering})
        self.clock = Clock(self.device)
        self.dense_kv = sum(c[n].nbytes for c in new_caches(self.cfg, batch=1, dtype=self.dtype, device="meta")[0]
                            for n in ("k", "v"))
        self.first_video_s = self._video()
        self.graphs_after_warmup = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        self.chunk_times: list[list[float]] = []
        self.kv_per_chunk: list[int] = []
        self.rss_per_chunk: list[int] = []

    def _video(self, on_chunk: Callable[[int], None] | None = None) -> float:
        from ...models import new_caches, rollout

        start = self.clock.mark()
        rollout(self.compiled, self.cfg, self.inputs,
                caches=new_caches(self.cfg, batch=1, dtype=self.dtype, device=self.device), on_chunk=on_chunk)
        return self.clock.seconds(start, self.clock.mark())

    def timed_video(self) -> float:
        """One video timed chunk by chunk, with the KV bytes and RSS after each chunk; its seconds."""
        from ...report import memory_report

        marks = [self.clock.mark()]
        kv_now, rss_now = [], []

        def on_chunk(chunk: int) -> None:
            marks.append(self.clock.mark())
            kv_now.append(memory_report(self.compiled).compact_bytes if self.mode == "compact" else self.dense_kv)
            rss_now.append(_rss())

        self._video(on_chunk)
        self.chunk_times.append([self.clock.seconds(a, b) for a, b in zip(marks, marks[1:])])
        self.kv_per_chunk, self.rss_per_chunk = kv_now, rss_now
        return sum(self.chunk_times[-1])

    def summary(self) -> dict[str, Any]:
        """The mode's numbers over its timed videos, then a profiled video for the attention share and the top ops."""
        if not self.chunk_times:
            raise RuntimeError("fkv bench: no timed video to summarize")
        # before the profiled video: the profiler's event buffers grow with the number of ops run, which is
        # larger for the compressed modes (gathers, sorts) and would be counted as their memory
        peak = peak_rss()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - self.graphs_after_warmup
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.clock.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            profiled = self._video()
        attention_s = _attention_seconds(prof)
        video_s = statistics.median(map(sum, self.chunk_times))
        selections = None  # select's kept ranges chosen and reused, over every video of this process
        if self.mode != "dense":
            from ...report import report

            selections = list(report(self.compiled, print_table=False).selections)
        latent_frames = 3 * GEOMETRIES[self.settings.geometry].chunks
        return {
            "mode": self.mode, "frame_tokens": self.cfg.frame_tokens, "video_s": video_s,
            "first_video_s": self.first_video_s, "compile_s": max(0.0, self.first_video_s - video_s),
            "fps": 4 * latent_frames / video_s, "chunk_s": [statistics.median(c) for c in zip(*self.chunk_times)],
            "attention_s": attention_s, "attention_share": attention_s / profiled if profiled else math.nan,
            "top_ops": _top_ops(prof, profiled),
            "kv_bytes": self.kv_per_chunk[-1], "kv_bytes_per_chunk": self.kv_per_chunk,
            "rss_bytes_per_chunk": self.rss_per_chunk, "dense_kv_bytes": self.dense_kv, "peak_rss_bytes": peak,
            "graphs_after_warmup": graphs, "selections": selections,
            "static_heads": self.plan.count(STATIC), "heads": self.plan.num_layers * self.plan.num_heads,
        }


_REPLY = "fkv-bench-reply: "  # marks the child's answers among whatever else the libraries print


def serve(s: BenchSettings, mode: str) -> None:
    """The child process of one mode: compile, then answer ``video`` and ``summary`` lines from the parent."""
    rollouts = ModeRollouts(s, mode)
    print(_REPLY + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = line.strip()
        if request == "video":
            print(_REPLY + json.dumps({"video_s": rollouts.timed_video()}), flush=True)
        elif request == "summary":
            print(_REPLY + json.dumps(rollouts.summary()), flush=True)
            return
        else:
            raise ValueError(f"fkv bench: the {mode} rollout got an unknown request {request!r}")


class _ModeProcess:
    """A :class:`ModeRollouts` in a fresh process (its peak RSS its own), one video per request, so that the modes'
    videos can take turns while the other processes wait. Started here, compiled once :meth:`ready` returns."""

    def __init__(self, s: BenchSettings, mode: str):
        self.mode = mode
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._process = subprocess.Popen([sys.executable, "-m", "fkv_compile.tools.bench", json.dumps(asdict(s)), mode],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True)

    def ready(self) -> None:
        """Wait until the mode is compiled and warm."""
        self._answer()

    def ask(self, request: str) -> dict[str, Any]:
        self._process.stdin.write(request + "\n")
        self._process.stdin.flush()
        return self._answer()

    def _answer(self) -> dict[str, Any]:
        for line in self._process.stdout:
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY):])
        self._process.wait()
        self._stderr.seek(0)
        raise RuntimeError(f"fkv bench: the {self.mode} rollout failed:\n{self._stderr.read()[-3000:]}")

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._stderr.close()

    def __enter__(self) -> _ModeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def alternating_rollouts(s: BenchSettings, modes: tuple[str, ...], advance: Callable[[], None] = lambda: None,
                         concurrent_compile: bool | None = None,
                         ) -> tuple[dict[str, dict[str, Any]], list[dict[str, float]]]:
    """Each mode's rollout numbers (:meth:`ModeRollouts.summary`) and the seconds of each round of videos: one
    process per mode, compiled, then ``s.repeats`` rounds in which every mode runs one video in turn (the order
    rotated from round to round), so that the modes' times are measured side by side.

    ``concurrent_compile`` (default: on a GPU): the processes compile at the same time, which is CPU work and
    saves minutes of a time-boxed GPU run, but each mode's compile time is then taken while the others compile;
    else one after the other, each on a quiet machine (a small CPU machine has no cores to spare)."""
    check_modes(modes)
    if concurrent_compile is None:
        concurrent_compile = torch.device(s.device).type == "cuda"
    with contextlib.ExitStack() as stack:
        processes = []
        for mode in modes:
            processes.append(stack.enter_context(_ModeProcess(s, mode)))
            if not concurrent_compile:
                processes[-1].ready()
                advance()
        if concurrent_compile:
            for process in processes:
                process.ready()
                advance()
        rounds = []
        for r in range(s.repeats):
            turn = processes[r % len(processes):] + processes[: r % len(processes)]
            rounds.append({p.mode: p.ask("video")["video_s"] for p in turn})
            advance()
        return {p.mode: p.ask("summary") for p in processes}, rounds


def in_fresh_process(argv: list[str], what: str) -> dict[str, Any]:
    """Run ``python <argv>`` in a new process (its peak RSS its own) and return the JSON its last output line holds."""
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def clone_seconds_per_chunk(s: BenchSettings) -> float:
    """LongLive v1's per-layer clone of the dense K and V cache, over every layer and forward of one chunk:
    the time ``compact`` removes (it serves the cache from the store and returns the cache itself)."""
    from ...models import new_caches
    from ...models.rollout import DENOISING_STEPS

    cfg, device = s.config(), torch.device(s.device)
    caches = new_caches(cfg, batch=1, dtype=getattr(torch, s.dtype), device=device)[0]
    for c in caches:  # not zeros: the same work as on a filled cache, whatever the allocator does with zeros
        for name in ("k", "v"):
            c[name].normal_()
    per_forward = median_seconds(lambda: [c[n].clone() for c in caches for n in ("k", "v")],
                                 repeats=max(5, s.repeats), device=device)
    return per_forward * (len(DENOISING_STEPS) + 1)

