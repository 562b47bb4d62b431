"""The Triton kernels at real size: range attention vs SDPA/FlashAttention on the same kept tokens and vs
dense, achieved bandwidth and TFLOP/s against this GPU's measured ceilings; segment similarity and commit.

Geometries (one attention call of the last chunk, 21-frame window, 3-frame chunk, 12 heads x 128):
Self Forcing 480p (1560 tokens per frame) and 1080p-like (8160). Plans: the reference Self Forcing
plan's most typical layer, all static, all dynamic.

    python benchmarks/kernels.py [--dtype bfloat16] [--geometry sf480 sf1080]   # needs a CUDA GPU

Timing is CUDA events via ``triton.testing.do_bench`` (median). "per visited token" compares the
kernel with SDPA run over the kept tokens gathered into a compact tensor (what a perfect gather
would leave), i.e. the kernel's efficiency, not counting the gather SDPA would need. Without a GPU
the script says what it cannot measure and times the interpreter on a tiny shape, as a sanity check
only (the interpreter is hundreds of times slower than any real kernel).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from attention import plans  # the same plans as the CPU attention benchmark
from common import write_results

from fkv_compile.tools.bench import GEOMETRIES as ALL_GEOMETRIES

# tokens per frame at real size: Self Forcing 480p (1560) and 1080p-like (8160)
GEOMETRIES = {"sf480": ALL_GEOMETRIES["self-forcing-5s"].frame_tokens, "sf1080": ALL_GEOMETRIES["1080p"].frame_tokens}


def ceilings(dtype: torch.dtype) -> dict[str, float]:
    """Measured device limits: copy bandwidth (GB/s) and dense matmul throughput (TFLOP/s)."""
    from triton.testing import do_bench

    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x))
    a = torch.randn(8192, 8192, dtype=dtype, device="cuda")
    mm = do_bench(lambda: a @ a)
    return {"copy_GBps": 2 * x.numel() / ms / 1e6, "matmul_TFLOPs": 2 * 8192**3 / mm / 1e9}


def bench_geometry(name: str, frame_tokens: int, dtype: torch.dtype, limits: dict[str, float]) -> list[dict]:
    from triton.testing import do_bench

    from fkv_compile.kernels.attention import range_attention
    from fkv_compile.kernels.gather import gather_tokens
    from fkv_compile.kernels.similarity import segment_similarity
    from fkv_compile.modes.dispatch import kernels_for
    from fkv_compile.modes.ranges import select_ranges
    from fkv_compile.semantics import window_layout

    h, d, n, c = 12, 128, 21, 3
    f = frame_tokens
    q = torch.randn(1, c * f, h, d, dtype=dtype, device="cuda").transpose(1, 2)
    k = torch.randn(1, n * f, h, d, dtype=dtype, device="cuda").transpose(1, 2)
    v = torch.randn(1, n * f, h, d, dtype=dtype, device="cuda").transpose(1, 2)
    layout = window_layout(c * f, n * f, f, c)
    dense_ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v))
    rows = []
    for plan_name, plan in plans(f, h).items():
        starts, ends = select_ranges(k, plan, 0, layout, kernels_for("triton", "cuda"))
        kept = int((ends - starts).sum())
        ms = do_bench(lambda: range_attention(q, k, v, starts, ends))
        # SDPA (FlashAttention on the GPU) over the same kept tokens, already gathered: one call per
        # group of heads with equal kept counts (no padding mask, which would rule Flash out)
        counts = (ends - starts).sum(-1)[0]
        groups = []
        for count in counts.unique().tolist():
            heads = (counts == count).nonzero().flatten()
            idx = torch.stack([torch.cat([torch.arange(int(s), int(e), device="cuda")
                                          for s, e in zip(starts[0, hh], ends[0, hh]) if e > s]) for hh in heads])
            gathered = [torch.gather(x[:, heads], 2, idx[None, ..., None].expand(-1, -1, -1, d)).contiguous()
                        for x in (k, v)]
            groups.append((q[:, heads].contiguous(), *gathered))
        sdpa_kept_ms = do_bench(lambda: [F.scaled_dot_product_attention(*g) for g in groups])
        flops = 4 * c * f * kept * d
        bytes_moved = (2 * kept * d + 2 * c * f * h * d) * q.element_size()
        row = {
            "geometry": name, "plan": plan_name, "kept_ratio": kept / (h * n * f),
            "kernel_ms": ms, "dense_sdpa_ms": dense_ms, "sdpa_on_kept_ms": sdpa_kept_ms,
            "speedup_vs_dense": dense_ms / ms, "efficiency_vs_sdpa_per_token": sdpa_kept_ms / ms,
            "TFLOPs": flops / ms / 1e9, "GBps": bytes_moved / ms / 1e6,
            "TFLOPs_share_of_matmul_ceiling": flops / ms / 1e9 / limits["matmul_TFLOPs"],
        }
        if plan.count("dynamic"):
            heads = torch.tensor([plan.heads(0, "dynamic")], device="cuda")
            cands = layout.candidates(plan.dynamic)
            row["similarity_ms"] = do_bench(lambda: segment_similarity(k, heads, cands.start, len(cands), f, 6))
            index = torch.arange(5 * f, device="cuda")[None]
            row["commit_gather_5_frames_ms"] = do_bench(lambda: gather_tokens(k, v, index))
        rows.append(row)
        print(f"{name:<7} {plan_name:<24} kept {row['kept_ratio']:.3f}  kernel {ms:7.3f} ms  dense {dense_ms:7.3f} ms "
              f"(x{row['speedup_vs_dense']:.2f})  SDPA on kept {sdpa_kept_ms:7.3f} ms "
              f"(efficiency {row['efficiency_vs_sdpa_per_token']:.2f})  {row['TFLOPs']:.0f} TFLOP/s", flush=True)
    return rows


def interpreter_sanity() -> dict:
    """CPU: one tiny interpreted call, checked against SDPA; not a performance number."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return {"skipped": "set TRITON_INTERPRET=1 to time the interpreter"}
    from fkv_compile.kernels.attention import range_attention

    q, k = torch.randn(1, 2, 48, 64), torch.randn(1, 2, 240, 64)
    starts, ends = torch.tensor([[[0], [0]]]), torch.tensor([[[240], [120]]])
    t = time.perf_counter()
    out = range_attention(q, k, k, starts, ends)
    seconds = time.perf_counter() - t
    sdpa = time.perf_counter()
    ref = torch.cat([F.scaled_dot_product_attention(q[:, :1], k[:, :1], k[:, :1]),
                     F.scaled_dot_product_attention(q[:, 1:], k[:, 1:, :120], k[:, 1:, :120])], 1)
    sdpa = time.perf_counter() - sdpa
    return {"interpreter_s": seconds, "sdpa_s": sdpa, "max_abs_error": float((out - ref).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--geometry", nargs="*", default=list(GEOMETRIES), choices=list(GEOMETRIES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: kernel time, bandwidth, TFLOP/s and the comparison with FlashAttention/SDPA need one "
              "(run this script on a GPU machine). Interpreter sanity check only:")
        sanity = interpreter_sanity()
        print(sanity)
        print(f"wrote {write_results('kernels_cpu', {'cuda': False, 'interpreter_sanity': sanity})}")
        return
    dtype = getattr(torch, args.dtype)
    limits = ceilings(dtype)
    print(f"{torch.cuda.get_device_name()}: copy {limits['copy_GBps']:.0f} GB/s, matmul {limits['matmul_TFLOPs']:.0f} "
          f"TFLOP/s ({args.dtype})")
    rows = [r for g in args.geometry for r in bench_geometry(g, GEOMETRIES[g], dtype, limits)]
    payload = {"cuda": True, "device": torch.cuda.get_device_name(), "dtype": args.dtype, "ceilings": limits,
               "rows": rows}
    print(f"wrote {write_results(f'gpu/kernels_{args.dtype}', payload)}")


if __name__ == "__main__":
    main()
