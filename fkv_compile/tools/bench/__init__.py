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

import csv
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .amdahl import NOISE, amdahl, attention_saving, kept_fraction, saving_in_words
from .calls import call_level, flex_call, pregathered
from .rollouts import ModeRollouts, alternating_rollouts, clone_seconds_per_chunk, in_fresh_process, peak_rss
from .settings import GEOMETRIES, MODES, BenchGeometry, BenchSettings, check_modes
from .timing import interleaved_times, median_seconds, paired_ratio

__all__ = ["BenchGeometry", "GEOMETRIES", "MODES", "BenchSettings", "run_bench", "ModeRollouts", "alternating_rollouts",
           "interleaved_times", "paired_ratio", "median_seconds", "in_fresh_process", "call_level",
           "pregathered", "flex_call", "kept_fraction", "amdahl", "attention_saving", "saving_in_words", "NOISE",
           "peak_rss"]


def run_bench(s: BenchSettings, out_dir: Path, modes: tuple[str, ...] = MODES, advance: Callable[[], None] = lambda: None,
              png: bool = True) -> dict[str, Any]:
    """Both levels at one geometry; writes ``bench_<geometry>.json``/``.csv`` (and ``.png``) into ``out_dir``.

    The JSON is written once the call level is measured (without ``rollout``) and again at the end, so that a run
    stopped by a time limit (a GPU run's) still leaves its call level."""
    check_modes(modes)
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
        from ..plots import plot_rollouts

        plot_rollouts(rollouts, s.geometry, stem.with_suffix(".png"))
    return result

