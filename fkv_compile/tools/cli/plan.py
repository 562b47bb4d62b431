"""``fkv plan show|validate|convert``: what a plan costs, whether it fits a model, and its file formats."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ...bundled import PLANS, bundled_plan
from ...plan import DENSE, PLAN_TYPE, REFERENCE_EMBEDDED, ROLES, HeadPlan, PlanError
from ...semantics import kept_token_count, rank_costs
from .common import CliError, emit, load_plan
from .targets import geometry_of

__all__ = ["cmd_plan_list", "cmd_plan_show", "cmd_plan_validate", "cmd_plan_convert"]


def cmd_plan_list(args: argparse.Namespace) -> int:
    """The plans shipped by name, with the model and native geometry each defaults to."""
    rows = []
    for entry in PLANS.values():
        plan = bundled_plan(entry.name)
        rows.append({"name": entry.name, "model": entry.model, "layers": plan.num_layers, "heads": plan.num_heads,
                     "static": plan.count("static"), "dynamic": plan.count("dynamic"),
                     "frame_tokens": plan.frame_tokens, "chunk_frames": plan.chunk_frames,
                     "window_frames": entry.window_frames})
    lines = [f"{'name':<18} {'layers x heads':>14} {'static':>6} {'dynamic':>7} {'tokens/frame':>12} {'chunk':>5} "
             f"{'window':>6}  model"]
    lines += [f"{r['name']:<18} {r['layers']:>7} x {r['heads']:<4} {r['static']:>6} {r['dynamic']:>7} "
              f"{r['frame_tokens']:>12} {r['chunk_frames']:>5} {r['window_frames']:>6}  {r['model']}" for r in rows]
    lines.append("use one as options={'plan': NAME} (geometry: options frame_tokens, chunk_frames) or fkv ... --plan NAME; "
                 "the Forcing-KV release's plans (Apache-2.0, fkv_compile/plans/NOTICE.md)")
    emit(args, {"plans": rows}, "\n".join(lines))
    return 0


def _show_rows(plan: HeadPlan, window_frames: int, video_frames: int, head_dim: int, dtype_bytes: int) -> list[dict[str, Any]]:
    """Per layer: heads per role, kept tokens at the full window, KV bytes attended per chunk and per video."""
    per_token = 2 * head_dim * dtype_bytes  # K and V of one head
    chunk_windows = [min(c + plan.chunk_frames, window_frames) for c in range(0, video_frames, plan.chunk_frames)]
    rows = []
    for layer, roles in enumerate(plan.roles):
        def tokens(frames: int, compressed: bool = True) -> float:
            return sum(kept_token_count(plan, r if compressed else DENSE, frames) for r in roles)

        rows.append({
            "layer": layer,
            **{role: roles.count(role) for role in ROLES},
            "kept_tokens": tokens(window_frames) / len(roles),
            "dense_tokens": window_frames * plan.frame_tokens,
            "bytes_per_chunk": tokens(window_frames) * per_token,
            "dense_bytes_per_chunk": tokens(window_frames, False) * per_token,
            "bytes_per_video": sum(tokens(n) for n in chunk_windows) * per_token,
            "dense_bytes_per_video": sum(tokens(n, False) for n in chunk_windows) * per_token,
        })
    return rows


def _rank_rows(plan: HeadPlan, world_size: int, window_frames: int) -> tuple[list[dict[str, Any]], float]:
    """Kept tokens per rank under head parallelism (``plan.shard``) and their imbalance (``RankCosts``)."""
    try:
        heads = plan.shard_heads(world_size)
    except PlanError as exc:
        raise CliError(f"--ranks {world_size}: {exc}") from None
    costs = rank_costs(plan, heads, window_frames)
    shards = [plan.head_slice(h) for h in heads]
    rows = [{"rank": r, "heads": f"{h.start}-{h.stop - 1}",
             "static": s.count("static"), "dynamic": s.count("dynamic"), "dense": s.count(DENSE),
             "kept_tokens": kept} for r, (h, s, kept) in enumerate(zip(heads, shards, costs.per_rank()))]
    return rows, costs.imbalance


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def cmd_plan_show(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    rows = _show_rows(plan, args.window_frames, args.video_frames or args.window_frames, args.head_dim, args.dtype_bytes)
    totals = {k: sum(r[k] for r in rows) for k in ("bytes_per_chunk", "dense_bytes_per_chunk", "bytes_per_video", "dense_bytes_per_video")}
    if args.png:
        from ..plots import plot_plan

        plot_plan(plan, args.png)
    lines = [
        f"plan: {plan.num_layers} layers x {plan.num_heads} heads, {plan.frame_tokens} tokens/frame, "
        f"{plan.chunk_frames}-frame chunks; window {args.window_frames} frames; KV attended in MiB "
        f"(head dim {args.head_dim}, {args.dtype_bytes} B/element)",
        f"{'layer':>5} {'static':>6} {'dyn':>4} {'dense':>5} {'kept/dense tokens':>20} {'MiB/chunk':>10} "
        f"{'dense':>9} {'MiB/video':>10} {'dense':>10}",
    ]
    for r in rows:
        lines.append(
            f"{r['layer']:>5} {r['static']:>6} {r['dynamic']:>4} {r['dense']:>5} "
            f"{r['kept_tokens']:>10.1f}/{r['dense_tokens']:<9} {_mib(r['bytes_per_chunk']):>10} "
            f"{_mib(r['dense_bytes_per_chunk']):>9} {_mib(r['bytes_per_video']):>10} {_mib(r['dense_bytes_per_video']):>10}"
        )
    lines.append(
        f"total: {_mib(totals['bytes_per_chunk'])} of {_mib(totals['dense_bytes_per_chunk'])} MiB per chunk "
        f"({totals['bytes_per_chunk'] / totals['dense_bytes_per_chunk']:.3f}), {_mib(totals['bytes_per_video'])} of "
        f"{_mib(totals['dense_bytes_per_video'])} MiB per video"
    )
    data = {"plan": str(args.plan), "window_frames": args.window_frames, "layers": rows, "totals": totals}
    if args.ranks:
        ranks, imbalance = _rank_rows(plan, args.ranks, args.window_frames)
        data.update(ranks=ranks, imbalance=imbalance)
        lines.append(f"head parallelism over {args.ranks} ranks (kept key tokens per chunk at the window, all layers):")
        lines += [f"  rank {r['rank']}: heads {r['heads']:<7} {r['static']:>4} static {r['dynamic']:>4} dynamic "
                  f"{r['dense']:>3} dense  {r['kept_tokens']:>12,.0f} tokens" for r in ranks]
        lines.append(f"  imbalance {imbalance:.3f}: every layer waits for its slowest rank (sum of per-layer maxima over "
                     "the sum of per-layer means)")
    emit(args, data, "\n".join(lines))
    return 0


def cmd_plan_validate(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    g = geometry_of(args)
    problems = g.misfits(plan)
    if problems:
        message = "plan does not match the model: " + "; ".join(problems)
        if args.json:
            print(json.dumps({"ok": False, "error": message}))
            return 1
        raise CliError(message)
    emit(args, {"ok": True}, f"OK: {args.plan} fits {g}")
    return 0


def cmd_plan_convert(args: argparse.Namespace) -> int:
    try:
        with open(args.src, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CliError(f"cannot read {args.src}: {exc}") from None
    if isinstance(doc, dict) and doc.get("type") == PLAN_TYPE:
        out, fmt = HeadPlan.from_dict(doc).to_reference_dict(), "reference"
    else:
        embedded = doc.get(REFERENCE_EMBEDDED, {}) if isinstance(doc, dict) else {}
        if (args.frame_tokens or embedded.get("frame_tokens")) is None or \
                (args.chunk_frames or embedded.get("chunk_frames")) is None:
            raise CliError("converting a reference plan needs --frame-tokens and --chunk-frames")
        plan = HeadPlan.from_reference_json(args.src, frame_tokens=args.frame_tokens, chunk_frames=args.chunk_frames)
        out, fmt = plan.to_dict(), "fkv_compile"
    with open(args.dst, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    emit(args, {"written": str(args.dst), "format": fmt}, f"wrote {args.dst} ({fmt} format)")
    return 0
