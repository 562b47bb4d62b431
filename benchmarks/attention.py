"""One attention call at Self Forcing's last-chunk geometry: dense SDPA vs ``select`` (kept tokens only).

The physical limit of the saving is the kept/dense token ratio. Two measured references beside it:
SDPA over the kept tokens gathered beforehand (one call per group of heads with equal kept counts:
what a perfect gather would leave, the practical limit), and FlexAttention, compiled, with the same
kept set as its block mask (the peer a user could write instead). ``select`` is timed twice: choosing its
ranges (a chunk's first call) and reusing them (its later denoising steps and clean pass: 4 of 5 calls).
All five take turns, once each per round (``--repeats`` rounds), and every ratio is the median over rounds of
two times from the same round, so that a shared machine's drift does not fall on one of them. Real geometry:
1560 tokens per frame, 12 heads x 128, 21-frame window, 3-frame chunk; on a CPU the frame is scaled down
(``--frame-tokens``, default 390 = 1/4), which scales both sides alike.

    python benchmarks/attention.py [--frame-tokens 390] [--dtype float32] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from common import write_results

from fkv_compile import HeadPlan
from fkv_compile.modes.select import SelectionMemo, compressed_attention
from fkv_compile.semantics import keep_mask
from fkv_compile.tools.bench import flex_call, interleaved_times, paired_ratio, pregathered

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
    rows = []
    print(f"Lq={3 * f} Lk={n * f} H={h} D={d} {args.dtype}, threads={torch.get_num_threads()}")
    print(f"{'plan':<26} {'kept/dense tokens':>18} {'select':>7} {'reused':>7} {'pre-gathered SDPA':>18} {'flex':>6}   "
          "(time / dense; select's share of the pre-gathered limit, choosing / reusing its ranges)")
    for name, plan in plans(f, h).items():
        _, kept = compressed_attention(q, k, v, plan, 0)
        token_ratio = float(kept.kept.sum()) / (h * kept.window)
        keep = keep_mask(k, plan, 0, q.shape[2])
        groups = pregathered(q, k, v, keep)
        memo = SelectionMemo()  # the same history at every call: a chunk's later calls
        times = interleaved_times({
            "dense": lambda: F.scaled_dot_product_attention(q, k, v),
            "select": lambda: compressed_attention(q, k, v, plan, 0),
            "reused": lambda: compressed_attention(q, k, v, plan, 0, memo=memo, history=(0, 0)),
            "limit": lambda: [F.scaled_dot_product_attention(*g) for g in groups],
            "flex": flex_call(q, k, v, keep)}, repeats=args.repeats, warmup=2)
        ms = {key: 1e3 * statistics.median(t) for key, t in times.items()}
        ratio = {key: paired_ratio(times, key, "dense") for key in times}
        share, share_reused = paired_ratio(times, "limit", "select"), paired_ratio(times, "limit", "reused")
        rows.append({"plan": name, "token_ratio": token_ratio, "time_ratio": ratio["select"], "select_ms": ms["select"],
                     "select_reused_ms": ms["reused"], "dense_ms": ms["dense"], "pregathered_sdpa_ms": ms["limit"],
                     "flex_ms": ms["flex"], "select_share_of_limit": share, "reused_share_of_limit": share_reused})
        print(f"{name:<26} {token_ratio:>18.3f} {ratio['select']:>7.3f} {ratio['reused']:>7.3f} "
              f"{ratio['limit']:>18.3f} "
              f"{ratio['flex']:>6.3f}   ({100 * share:.0f}% / {100 * share_reused:.0f}%; dense {ms['dense']:.1f} ms)")
    path = write_results(f"attention_cpu_{args.dtype}_F{f}", {"args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
