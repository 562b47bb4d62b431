"""``fkv bench``: time and memory, dense vs ``select`` vs ``compact``, at named geometries."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..bench import GEOMETRIES, BenchSettings, run_bench, saving_in_words
from ..progress import Progress
from .common import CliError, emit

__all__ = ["cmd_bench"]


def cmd_bench(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise CliError(f"--repeats must be at least 1, got {args.repeats}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    side = args.side if args.side is not None else (1 if device == "cuda" else 2)
    runs = {name: _settings(args, name, side, device) for name in args.geometry}  # every misfit said before any work
    results, lines = {}, []
    with Progress(len(args.geometry) * (1 + len(args.modes) + args.repeats), "benchmarking",
                  enabled=not (args.quiet or args.json)) as bar:
        for name, settings in runs.items():
            try:
                result = run_bench(settings, Path(args.out), tuple(args.modes), bar.advance, png=not args.no_png)
            except (ValueError, RuntimeError) as exc:
                raise CliError(str(exc)) from None
            results[name] = result
            g = result["geometry"]
            scale = "" if GEOMETRIES[name].miniature else f" ({g['real_frame_tokens']} at real size)"
            lines.append(f"{name}: {GEOMETRIES[name].note}; {g['frame_tokens']} tokens per frame here{scale}, "
                         f"{settings.layers} layers x {settings.heads} heads, {device}")
            for row in result["call"]:
                lines.append(f"  call, layer {row['layer']}: kept/dense tokens {row['kept_ratio']:.3f}; time vs dense: "
                             f"select {row['select_ratio']:.3f} (ranges reused {row['select_reused_ratio']:.3f}), "
                             f"compact {row['compact_ratio']:.3f}, SDPA on the kept "
                             f"tokens gathered beforehand {row['pregathered_ratio']:.3f}, FlexAttention "
                             f"{row['flex_ratio']:.3f} (dense {row['dense_ms']:.1f} ms, {row['kernels']} kernels); "
                             f"share of the pre-gathered limit: select {100 * row['select_share_of_limit']:.0f}% "
                             f"(reusing {100 * row['select_reused_share_of_limit']:.0f}%), "
                             f"compact {100 * row['compact_share_of_limit']:.0f}%")
            for mode, r in result["rollout"].items():
                ratio = result.get("ratios_vs_dense", {}).get(mode, {})
                lines.append(f"  rollout {mode:<8} video {r['video_s']:8.3f} s"
                             + (f" (x{ratio['video_time']:.3f} of dense, rounds "
                                + "/".join(f"{x:.3f}" for x in ratio["video_time_by_round"])
                                + f"; limit x{ratio['amdahl_limit']:.3f}, "
                                + saving_in_words(ratio["saving_realised"], 1 - ratio["amdahl_limit"], "the video's")
                                + f"; attention x{ratio['attention_time']:.3f}, "
                                + saving_in_words(ratio["attention_saving_realised"], 1 - result["kept_fraction"],
                                            "attention's") + ")" if ratio else "")
                             + f"  attention {100 * r['attention_share']:4.1f}%  KV {r['kv_bytes'] / 2**20:8.1f} MiB"
                             + f"  peak RSS {r['peak_rss_bytes'] / 2**20:8.1f} MiB  compile {r['compile_s']:6.1f} s"
                             + f"  recompiles {r['graphs_after_warmup']}  FPS {r['fps']:.2f}"
                             + ("  kept ranges chosen {}, reused {}, none needed {}".format(*r["selections"])
                                if r["selections"] and any(r["selections"]) else ""))
                lines.append("    self time by op: " + ", ".join(f"{o['op']} {100 * o['share']:.1f}% ({o['calls']})"
                                                           for o in r["top_ops"]))
            if "compact_vs_select" in result:
                lines.append(f"  compact / select video time: x{result['compact_vs_select']:.3f} (median of same-round "
                             "pairs)")
            if "clone_s_per_chunk" in result:
                lines.append(f"  LongLive's per-layer cache clones: {1e3 * result['clone_s_per_chunk']:.1f} ms per chunk in "
                             "dense and select, none in compact")
    lines.append("wrote " + ", ".join(path for r in results.values() for path in r["files"]))
    emit(args, results, "\n".join(lines))
    return 0


def _settings(args: argparse.Namespace, name: str, side: int, device: str) -> BenchSettings:
    """The run at geometry ``name``: a bundled miniature's sizes are its defaults (else BenchSettings'); its plan
    checked against the model."""
    mini = GEOMETRIES[name].miniature
    own = (mini.num_layers, mini.num_heads, mini.head_dim) if mini else (None, None, None)
    sizes = {field: given or default for field, given, default in
             zip(("layers", "heads", "head_dim"), (args.layers, args.heads, args.head_dim), own) if given or default}
    settings = BenchSettings(geometry=name, side=1 if mini else side, dtype=args.dtype, repeats=args.repeats,
                             device=device, plan=args.plan, lowering=args.lowering, **sizes)
    try:
        settings.head_plan(settings.config())
    except (ValueError, OSError) as exc:  # PlanError is a ValueError; OSError: the plan file
        raise CliError(str(exc)) from None
    return settings
