"""``fkv bench``: time and memory of dense vs ``select`` vs ``compact`` at named geometries.

Two levels, on the Self Forcing-style miniature with random weights:

- ``call``: one attention call of a full window's last chunk: dense SDPA, ``select`` (kept tokens
  of the dense window; choosing its ranges, as a chunk's first call, and reusing them, as its later calls)
  and ``compact`` (a store filled by a rollout of writes), against the kept/dense token ratio that
  bounds them, SDPA over the kept tokens gathered beforehand (the practical limit) and FlexAttention
  with the kept set as its block mask (the peer).
- ``rollout``: a whole video per mode, each mode in its own process so that its peak RSS is its
  own: time per chunk (median over the timed videos after a warm-up video), the attention share of
  the time (one profiled video, last), KV bytes per chunk, peak RSS (compile and the timed videos,
  not the profiled one), compile time (first video minus a warm one; on a GPU the modes compile at the
  same time) and graphs compiled after the warm-up (recompiles). On CUDA the clock is CUDA events
  and FPS is reported as the papers define it: 4 x latent frames / diffusion time.

Both levels measure side by side: in rounds, each contender once per round in an order rotated from round
to round (:func:`interleaved_times`; for rollouts the mode processes take turns, one video each, while the
others wait), and a ratio is the median over rounds of the two times in the same round. On a shared machine
whose speed drifts over minutes, times taken one contender after the other are not comparable.

Each compressed rollout is set against its Amdahl limit: the dense run's attention share shrunk to the
kept fraction of key tokens over the video (:func:`kept_fraction`), everything else unchanged; the
row shows the share of that possible saving it realises.

At ``longlive-window`` the miniature runs LongLive v1's staged cache, and the time of the
per-layer clones of one chunk (which ``compact`` removes) is measured on its own.

Geometries are real sizes scaled by ``side`` (latent height and width divided by it; tokens per
frame by its square); the model is ``layers`` layers of 12 heads x 128 (Self Forcing's 30 layers
at real size). The plan defaults to the reference Self Forcing plan's share of static heads
(37%), alternating per layer, or ``--plan``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..plan import DYNAMIC, STATIC, HeadPlan
from ..semantics import kept_token_count

__all__ = ["BenchGeometry", "GEOMETRIES", "BenchSettings", "run_bench", "ModeRollouts", "alternating_rollouts",
           "interleaved_times", "paired_ratio", "median_seconds", "in_fresh_process",
           "pregathered", "flex_call", "kept_fraction", "amdahl", "attention_saving", "saving_in_words", "peak_rss"]

MODES = ("dense", "select", "compact")
ATTENTION_OPS = ("fkv::select_attention", "fkv::store_attention", "fkv::oracle_attention")


@dataclass(frozen=True)
class BenchGeometry:
    """A real-size geometry: latent frame size (before the 2 x 2 patch), attention window, chunks per video."""

    latent: tuple[int, int]
    window_frames: int | None  # None: global attention over the whole video
    sink_frames: int
    chunks: int
    note: str
    cache_style: str = "slots"  # the miniature's cache pattern (fkv_compile.models.MiniConfig.cache_style)

    @property
    def frame_tokens(self) -> int:
        """Tokens per frame at real size (the latent frame in 2 x 2 patches)."""
        return self.latent[0] * self.latent[1] // 4


GEOMETRIES = {
    "self-forcing-5s": BenchGeometry((60, 104), None, 3, 7, "Self Forcing 480p, 5 s = 21 latent frames, global"),
    "longlive-window": BenchGeometry((60, 104), 12, 3, 10, "LongLive v1 480p, 12-frame window with a 3-frame sink, "
                                     "staged cache", "longlive"),
    "1080p": BenchGeometry((136, 240), None, 3, 7, "1080p-like (8160 tokens per frame), 21 frames, global"),
    "tiny": BenchGeometry((8, 12), 12, 3, 5, "a test geometry (24 tokens per frame)"),
}


@dataclass(frozen=True)
class BenchSettings:
    geometry: str
    side: int = 2  # latent height and width divided by this
    layers: int = 4
    heads: int = 12
    head_dim: int = 128
    dtype: str = "float32"
    repeats: int = 3  # rounds of timed videos, one per mode
    device: str = "cpu"
    plan: str | None = None
    lowering: str = "inductor"  # dense runs backend=lowering; the compressed modes lower with it too

    def config(self):
        from ..models import MiniConfig

        g = GEOMETRIES[self.geometry]
        h, w = (x // self.side for x in g.latent)
        if h % 2 or w % 2 or h < 2 or w < 2:
            raise ValueError(f"side {self.side} leaves a {h} x {w} latent for {self.geometry}; it must be even")
        dim = self.heads * self.head_dim
        return MiniConfig(dim=dim, num_heads=self.heads, num_layers=self.layers, ffn_dim=dim, latent_height=h,
                          latent_width=w, num_frames=3 * g.chunks, window_frames=g.window_frames,
                          sink_frames=g.sink_frames, cache_style=g.cache_style)

    def head_plan(self, cfg) -> HeadPlan:
        if self.plan:
            plan = HeadPlan.load(self.plan)
            return HeadPlan.from_roles(plan.roles[: cfg.num_layers], frame_tokens=cfg.frame_tokens, chunk_frames=3)
        return HeadPlan.from_roles(
            [[STATIC if (h + layer) % 8 in (0, 3, 5) else DYNAMIC for h in range(cfg.num_heads)]
             for layer in range(cfg.num_layers)], frame_tokens=cfg.frame_tokens, chunk_frames=3)


class _Clock:
    """Wall time on CPU, CUDA events on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return end - start


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
        from ..models import build, make_inputs, new_caches

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
        self.clock = _Clock(self.device)
        self.dense_kv = sum(c[n].nbytes for c in new_caches(self.cfg, batch=1, dtype=self.dtype, device="meta")[0]
                            for n in ("k", "v"))
        self.first_video_s = self._video()
        self.graphs_after_warmup = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        self.chunk_times: list[list[float]] = []
        self.kv_per_chunk: list[int] = []
        self.rss_per_chunk: list[int] = []

    def _video(self, on_chunk: Callable[[int], None] | None = None) -> float:
        from ..models import new_caches, rollout

        start = self.clock.mark()
        rollout(self.compiled, self.cfg, self.inputs,
                caches=new_caches(self.cfg, batch=1, dtype=self.dtype, device=self.device), on_chunk=on_chunk)
        return self.clock.seconds(start, self.clock.mark())

    def timed_video(self) -> float:
        """One video timed chunk by chunk, with the KV bytes and RSS after each chunk; its seconds."""
        from ..report import memory_report

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
            from ..report import report

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


def _serve(s: BenchSettings, mode: str) -> None:
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


def _check_modes(modes: tuple[str, ...]) -> None:
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown bench mode {mode!r}; expected some of {MODES}")


def alternating_rollouts(s: BenchSettings, modes: tuple[str, ...], advance: Callable[[], None] = lambda: None,
                         concurrent_compile: bool | None = None,
                         ) -> tuple[dict[str, dict[str, Any]], list[dict[str, float]]]:
    """Each mode's rollout numbers (:meth:`ModeRollouts.summary`) and the seconds of each round of videos: one
    process per mode, compiled, then ``s.repeats`` rounds in which every mode runs one video in turn (the order
    rotated from round to round), so that the modes' times are measured side by side.

    ``concurrent_compile`` (default: on a GPU): the processes compile at the same time, which is CPU work and
    saves minutes of a time-boxed GPU run, but each mode's compile time is then taken while the others compile;
    else one after the other, each on a quiet machine (a small CPU machine has no cores to spare)."""
    _check_modes(modes)
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


def call_level(s: BenchSettings) -> list[dict[str, Any]]:
    """One attention call of the last chunk of a full window: dense vs select vs compact, side by side."""
    from ..modes.dispatch import kernels_for
    from ..modes.select import SelectionMemo, compressed_attention
    from ..modes.store import LayerStore
    from ..semantics import keep_mask

    cfg, device, dtype = s.config(), torch.device(s.device), getattr(torch, s.dtype)
    plan = s.head_plan(cfg)
    f, c, frames = cfg.frame_tokens, cfg.chunk_frames, cfg.cache_frames
    gen = torch.Generator().manual_seed(0)
    k_all, v_all = (torch.randn(1, frames * f, cfg.num_heads, cfg.head_dim, generator=gen).to(device, dtype)
                    for _ in range(2))
    q = torch.randn(1, c * f, cfg.num_heads, cfg.head_dim, generator=gen).to(device, dtype).transpose(1, 2)
    k, v = k_all.transpose(1, 2), v_all.transpose(1, 2)
    kernels = kernels_for("auto", device.type)
    rows = []
    for layer in range(min(plan.num_layers, 2)):
        store = LayerStore(plan, layer, kernels)
        for start in range(0, frames * f, c * f):
            end = start + c * f
            store.write(k_all[:, start:end], v_all[:, start:end], start, end, (0, end))
        kept = compressed_attention(q, k, v, plan, layer, kernels=kernels)[1]
        keep = keep_mask(k, plan, layer, q.shape[2])
        groups = pregathered(q, k, v, keep)
        memo = SelectionMemo()  # the same history at every call: a chunk's later calls
        calls = {"dense": lambda: F.scaled_dot_product_attention(q, k, v),
                 "select": lambda: compressed_attention(q, k, v, plan, layer, kernels=kernels),
                 "select_reused": lambda: compressed_attention(q, k, v, plan, layer, kernels=kernels, memo=memo,
                                                               history=(0, 0)),
                 "compact": lambda: store.attention(q, (0, frames * f), None),
                 "pregathered": lambda: [F.scaled_dot_product_attention(*g) for g in groups],
                 "flex": flex_call(q, k, v, keep)}
        times = interleaved_times(calls, repeats=max(3, s.repeats), warmup=2, device=device)
        row = {"layer": layer, "kept_ratio": float(kept.kept.mean()) / kept.window, "kernels": kernels.name}
        for name in calls:
            row[f"{name}_ms"] = 1e3 * statistics.median(times[name])
            if name != "dense":
                row[f"{name}_ratio"] = paired_ratio(times, name, "dense")
        for name in ("select", "select_reused", "compact"):  # the goals: >= 92% (select), >= 97% (compact)
            row[f"{name}_share_of_limit"] = paired_ratio(times, "pregathered", name)
        rows.append(row)
    return rows


def kept_fraction(plan: HeadPlan, window_frames: int | None, chunks: int) -> float:
    """Kept over dense key tokens, summed over every chunk's window, layer and head of a video: the share of dense
    attention work the keep rule leaves."""
    kept = dense = 0.0
    for chunk in range(chunks):
        frames = (chunk + 1) * plan.chunk_frames
        window = frames if window_frames is None else min(frames, window_frames)
        for role in (role for row in plan.roles for role in row):
            dense += window * plan.frame_tokens
            kept += kept_token_count(plan, role, window)
    return kept / dense


def amdahl(ratio: float, attention_share: float, kept: float) -> dict[str, float]:
    """The best video time ratio the kept tokens allow when only attention shrinks (``1 - a + a * kept``, ``a`` the
    dense run's attention share), and the share of that saving a measured ``ratio`` realises."""
    limit = 1 - attention_share + attention_share * kept
    return {"amdahl_limit": limit, "saving_realised": (1 - ratio) / (1 - limit) if limit < 1 else math.nan}


NOISE = 0.05  # a possible saving below this share of the time is within what a shared machine's timing moves


def saving_in_words(share: float, possible: float, what: str) -> str:
    """The share of a possible saving (``possible``: a fraction of the time) a run realised, in words that hold at
    every size: at a tiny size the possible saving drowns in timing noise and the share means nothing."""
    if possible < NOISE:
        return f"{what} possible saving ({100 * possible:.1f}%) is within timing noise at this size"
    if share < 0:
        return f"slower than dense: per-call costs outweigh {what} possible {100 * possible:.0f}% at this size"
    return f"{100 * share:.0f}% of {what} possible {100 * possible:.0f}% saving realised"


def attention_saving(ratio: float, kept: float) -> dict[str, float]:
    """The profiled attention time over dense (``ratio``) and the share it realises of the saving the kept
    fraction allows there (``1 - kept``): the rollout's saving without the noise of its dense compute, which
    on a shared CPU moves a video's time by more than the attention saves. ``compact``'s attention op also
    writes the chunk into its store (dense and ``select`` write their cache outside attention)."""
    return {"attention_time": ratio, "attention_saving_realised": (1 - ratio) / (1 - kept) if kept < 1 else math.nan}


def clone_seconds_per_chunk(s: BenchSettings) -> float:
    """LongLive v1's per-layer clone of the dense K and V cache, over every layer and forward of one chunk:
    the time ``compact`` removes (it serves the cache from the store and returns the cache itself)."""
    from ..models import new_caches
    from ..models.rollout import DENOISING_STEPS

    cfg, device = s.config(), torch.device(s.device)
    caches = new_caches(cfg, batch=1, dtype=getattr(torch, s.dtype), device=device)[0]
    for c in caches:  # not zeros: the same work as on a filled cache, whatever the allocator does with zeros
        for name in ("k", "v"):
            c[name].normal_()
    per_forward = median_seconds(lambda: [c[n].clone() for c in caches for n in ("k", "v")],
                                 repeats=max(5, s.repeats), device=device)
    return per_forward * (len(DENOISING_STEPS) + 1)


def pregathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """q, K and V of each group of heads with equal kept counts, the kept tokens gathered (batch 1)."""
    counts = keep[0].sum(-1)
    groups = []
    for count in counts.unique().tolist():
        heads = (counts == count).nonzero().flatten()
        index = torch.stack([keep[0, h].nonzero().flatten() for h in heads.tolist()])  # [G, count]
        gathered = [torch.gather(x[:, heads], 2, index[None, ..., None].expand(-1, -1, -1, x.shape[-1])).contiguous()
                    for x in (k, v)]
        groups.append((q[:, heads].contiguous(), *gathered))
    return groups


def flex_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor):
    """FlexAttention, compiled, over the kept set as a block mask (blocks with no kept token are skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def kept(b, h, q_idx, kv_idx):
        return keep[b, h, kv_idx]

    mask = create_block_mask(kept, keep.shape[0], keep.shape[1], q.shape[2], k.shape[2], device=str(q.device))
    compiled = torch.compile(flex_attention, dynamic=False)
    qc, kc, vc = (x.contiguous() for x in (q, k, v))
    return lambda: compiled(qc, kc, vc, block_mask=mask)


def interleaved_times(fns: dict[str, Callable[[], Any]], *, repeats: int = 3, warmup: int = 1,
                      device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Each function's time in each of ``repeats`` rounds (after ``warmup`` untimed rounds; CUDA events on a GPU).
    A round runs every function once, in an order rotated from round to round, so that the drift of a shared
    machine falls on all of them alike: their ratios are measured side by side (:func:`paired_ratio`)."""
    clock = _Clock(torch.device(device))
    names = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = clock.mark()
            fns[name]()
            times[name].append(clock.seconds(start, clock.mark()))
    return times


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """The median over rounds of ``num``'s time over ``den``'s in the same round."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def median_seconds(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1,
                   device: torch.device | str = "cpu") -> float:
    """Median time of ``fn()`` over ``repeats`` runs after ``warmup`` runs (CUDA events on a GPU)."""
    return statistics.median(interleaved_times({"fn": fn}, repeats=repeats, warmup=warmup, device=device)["fn"])


def in_fresh_process(argv: list[str], what: str) -> dict[str, Any]:
    """Run ``python <argv>`` in a new process (its peak RSS its own) and return the JSON its last output line holds."""
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_bench(s: BenchSettings, out_dir: Path, modes: tuple[str, ...] = MODES, advance: Callable[[], None] = lambda: None,
              png: bool = True) -> dict[str, Any]:
    """Both levels at one geometry; writes ``bench_<geometry>.json``/``.csv`` (and ``.png``) into ``out_dir``.

    The JSON is written once the call level is measured (without ``rollout``) and again at the end, so that a run
    stopped by a time limit (a GPU run's) still leaves its call level."""
    _check_modes(modes)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"bench_{s.geometry}"
    g = GEOMETRIES[s.geometry]
    result = {"settings": asdict(s), "geometry": {**asdict(g), "frame_tokens": s.config().frame_tokens,
                                                    "real_frame_tokens": g.frame_tokens},
              "machine": {"device": torch.cuda.get_device_name() if s.device == "cuda" else "cpu",
                          "threads": torch.get_num_threads(), "torch": torch.__version__},
              "call": call_level(s)}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    advance()
    rollouts, rounds = alternating_rollouts(s, modes, advance)
    result.update(rollout=rollouts, rounds=rounds)
    if g.cache_style == "longlive":
        result["clone_s_per_chunk"] = clone_seconds_per_chunk(s)
    video_times = {m: [times[m] for times in rounds] for m in rollouts}  # per mode, round by round
    if "dense" in rollouts:
        dense = rollouts["dense"]
        kept = kept_fraction(s.head_plan(s.config()), g.window_frames, g.chunks)
        result["kept_fraction"] = kept
        result["ratios_vs_dense"] = {}
        for m, r in rollouts.items():
            if m == "dense":
                continue
            by_round = [times[m] / times["dense"] for times in rounds]
            ratio = paired_ratio(video_times, m, "dense")  # each round's videos ran minutes apart at most
            result["ratios_vs_dense"][m] = {"video_time": ratio, "video_time_by_round": by_round,
                                            "kv_bytes": r["kv_bytes"] / dense["kv_bytes"],
                                            "peak_rss": r["peak_rss_bytes"] / dense["peak_rss_bytes"],
                                            **amdahl(ratio, dense["attention_share"], kept),
                                            **attention_saving(r["attention_s"] / dense["attention_s"], kept)}
    if {"select", "compact"} <= set(rollouts):  # the goal "compact no slower than select", side by side too
        result["compact_vs_select"] = paired_ratio(video_times, "compact", "select")
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["geometry", "mode", "chunk", "seconds", "kv_bytes", "rss_bytes"])
        for mode, r in rollouts.items():
            for chunk, row in enumerate(zip(r["chunk_s"], r["kv_bytes_per_chunk"], r["rss_bytes_per_chunk"])):
                writer.writerow([s.geometry, mode, chunk, *row])
    result["files"] = [str(stem.with_suffix(suffix)) for suffix in (".json", ".csv", ".png")[: 3 if png else 2]]
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    if png:
        from .plots import plot_rollouts

        plot_rollouts(rollouts, s.geometry, stem.with_suffix(".png"))
    return result


if __name__ == "__main__":  # the child process of one rollout mode
    _serve(BenchSettings(**json.loads(sys.argv[1])), sys.argv[2])
