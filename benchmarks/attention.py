"""One attention call at Self Forcing's last-chunk geometry: dense SDPA vs ``select`` (kept tokens only).

The physical limit of the saving is the kept/dense token ratio. Two measured references beside it:
SDPA over the kept tokens gathered beforehand (one call per group of heads with equal kept counts:
what a perfect gather would leave, the practical limit), and FlexAttention, compiled, with the same
kept set as its block mask (the peer a user could write instead). ``select`` is timed twice: choosing its
ranges (a chunk's first call) and reusing them (its later denoising steps and clean pass: 4 of 5 calls). Real geometry: 1560 tokens per frame, 12 heads x 128, 21-frame window, 3-frame
chunk; on a CPU the frame is scaled down (``--frame-tokens``, default 390 = 1/4), which scales
both sides alike.

    python benchmarks/attention.py [--frame-tokens 390] [--dtype float32] [--repeats 7]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from common import median_seconds, write_results

from fkv_compile import HeadPlan
from fkv_compile.modes.select import SelectionMemo, compressed_attention
from fkv_compile.semantics import keep_mask
from fkv_compile.tools.bench import flex_call, pregathered

REFERENCE_PLAN = Path(__file__).resolve().parents[1] / "fkv_compile" / "plans" / "forcingkv_heads_selfforcing.json"


def plans(frame_tokens: int, heads: int) -> dict[str, HeadPlan]:
    geometry = {"frame_tokens": frame_tokens, "chunk_frames": 3}
    reference = HeadPlan.from_reference_json(REFERENCE_PLAN, **geometry)
    # the reference layer whose static count is closest to the plan's mean (134 / 360 static)
    mean_static = reference.count("static") / reference.num_layers
    typical = min(range(reference.num_layers), key=lambda i: abs(reference.roles[i].count("static") - mean_static))
    return {
        "all static": HeadPlan.uniform("static", num_layers=1, num_heads=heads, **geometry),
        "all dynamic": HeadPlan.uniform("dynamic", num_layers=1, num_heads=heads, **geometry),
        f"self forcing layer {typical}": HeadPlan.from_roles([reference.roles[typical]], **geometry),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frame-tokens", type=int, default=390)
    parser.add_argument("--window-frames", type=int, default=21)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    f, n, h, d = args.frame_tokens, args.window_frames, args.heads, args.head_dim
    torch.manual_seed(0)
    # [B, L, H, D] as the models store it, viewed as [B, H, L, D] for attention (no copies)
    q = torch.randn(1, 3 * f, h, d, dtype=dtype).transpose(1, 2)
    k = torch.randn(1, n * f, h, d, dtype=dtype).transpose(1, 2)
    v = torch.randn(1, n * f, h, d, dtype=dtype).transpose(1, 2)
    dense = median_seconds(lambda: F.scaled_dot_product_attention(q, k, v), repeats=args.repeats)
    rows = []
    print(f"Lq={3 * f} Lk={n * f} H={h} D={d} {args.dtype}, threads={torch.get_num_threads()}")
    print(f"{'plan':<26} {'kept/dense tokens':>18} {'select':>7} {'reused':>7} {'pre-gathered SDPA':>18} {'flex':>6}   "
          "(time / dense; select's share of the pre-gathered limit, choosing / reusing its ranges)")
    for name, plan in plans(f, h).items():
        _, kept = compressed_attention(q, k, v, plan, 0)
        token_ratio = float(kept.kept.sum()) / (h * kept.window)
        t = median_seconds(lambda: compressed_attention(q, k, v, plan, 0), repeats=args.repeats)
        memo = SelectionMemo()  # the same history at every call: a chunk's later calls
        reused = median_seconds(lambda: compressed_attention(q, k, v, plan, 0, memo=memo, history=(0, 0)),
                                repeats=args.repeats)
        keep = keep_mask(k, plan, 0, q.shape[2])
        groups = pregathered(q, k, v, keep)
        limit = median_seconds(lambda: [F.scaled_dot_product_attention(*g) for g in groups], repeats=args.repeats)
        flex = median_seconds(flex_call(q, k, v, keep), repeats=args.repeats, warmup=2)
        rows.append({"plan": name, "token_ratio": token_ratio, "time_ratio": t / dense, "select_ms": 1e3 * t,
                     "select_reused_ms": 1e3 * reused, "dense_ms": 1e3 * dense, "pregathered_sdpa_ms": 1e3 * limit,
                     "flex_ms": 1e3 * flex, "select_share_of_limit": limit / t, "reused_share_of_limit": limit / reused})
        print(f"{name:<26} {token_ratio:>18.3f} {t / dense:>7.3f} {reused / dense:>7.3f} {limit / dense:>18.3f} "
              f"{flex / dense:>6.3f}   ({100 * limit / t:.0f}% / {100 * limit / reused:.0f}%; dense {1e3 * dense:.1f} ms)")
    path = write_results(f"attention_cpu_{args.dtype}_F{f}", {"args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
