"""The Triton kernels on the GPU against the float64 oracle, at a real geometry, in bf16, fp16 and fp32;
and the autotune cache: the first call tunes and writes it, a fresh process reads it and tunes nothing.

Each kernel's error against float64 must stay within the budget of an independent implementation in
the same dtype (SDPA with a mask, the torch similarity), twice its error, as the test suite checks on
CPU through the interpreter; the gather must be exact. Exit status 1 when a check fails.

    python benchmarks/gpu_check.py                                  # needs a CUDA GPU (benchmarks/gpu.sh runs it)
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --device cpu --frame-tokens 8 --heads 2 --head-dim 16
                                                                    # a dry run through the interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from attention import plans  # the same plans as the attention benchmark
from common import write_results

from fkv_compile.modes import torch_ops
from fkv_compile.modes.dispatch import kernels_for
from fkv_compile.modes.ranges import select_ranges
from fkv_compile.semantics import candidate_similarity, keep_mask, selection_keys, window_layout
from fkv_compile.tools.testing import error_budget, max_abs_error

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _inputs(frame_tokens: int, heads: int, head_dim: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    """q ``[1, H, 3F, D]``, k and v ``[1, H, 21F, D]``: the models' ``[B, L, H, D]`` layout seen heads-major."""
    gen = torch.Generator().manual_seed(0)
    lengths = (3 * frame_tokens, 21 * frame_tokens, 21 * frame_tokens)
    return tuple(torch.randn(1, n, heads, head_dim, generator=gen).to(device, dtype).transpose(1, 2) for n in lengths)


def check_kernels(frame_tokens: int, heads: int, head_dim: int, device: str) -> list[dict]:
    """Every kernel, every plan, every dtype: error, budget and verdict."""
    triton = kernels_for("triton", device)
    rows = []
    for dtype in DTYPES:
        q, k, v = _inputs(frame_tokens, heads, head_dim, dtype, device)
        layout = window_layout(q.shape[2], k.shape[2], frame_tokens, 3)
        for name, plan in plans(frame_tokens, heads).items():
            starts, ends = select_ranges(k, plan, 0, layout, triton)
            mask = keep_mask(k, plan, 0, q.shape[2])[:, :, None, :]
            reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
            independent = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out = triton.range_attention(q, k, v, starts, ends, None)
            budget = error_budget(independent, reference, floor=4 * torch.finfo(dtype).eps)
            rows.append({"kernel": "range_attention", "plan": name, "dtype": str(dtype),
                         "error": max_abs_error(out, reference), "budget": budget})
            dynamic = plan.heads(0, "dynamic")
            if dynamic:  # the keep rule's similarity in float64; the kernel accumulates in float32 (the suite's 1e-5)
                cands = layout.candidates(plan.dynamic)
                reference = candidate_similarity(selection_keys(k.double(), dynamic, plan.selection), layout,
                                                 plan.dynamic)
                got = triton.segment_similarity(k, torch.tensor([list(dynamic)], device=device), cands.start,
                                                len(cands), frame_tokens, plan.dynamic.segments_per_frame)
                rows.append({"kernel": "segment_similarity", "plan": name, "dtype": str(dtype),
                             "error": max_abs_error(got, reference), "budget": 1e-5})
        index = torch.randint(-1, k.shape[2], (1, 5 * frame_tokens), device=device)
        gathered = triton.gather_tokens(k, v, index)
        rows.append({"kernel": "gather_tokens", "plan": "-", "dtype": str(dtype), "budget": 0.0,
                     "error": max(max_abs_error(a, b) for a, b in zip(gathered, torch_ops.gather_tokens(k, v, index)))})
    for row in rows:
        row["ok"] = row["error"] <= row["budget"]
        print(f"{row['kernel']:<19} {row['plan']:<24} {row['dtype']:<15} error {row['error']:.3e}  budget "
              f"{row['budget']:.3e}  {'ok' if row['ok'] else 'FAILED'}", flush=True)
    return rows


def _one_call(args: argparse.Namespace) -> float:
    """Seconds of the first range-attention call in this process (tuning included when the cache is empty)."""
    q, k, v = _inputs(args.frame_tokens, args.heads, args.head_dim, torch.bfloat16, args.device)
    plan = next(iter(plans(args.frame_tokens, args.heads).values()))
    triton = kernels_for("triton", args.device)
    starts, ends = select_ranges(k, plan, 0, window_layout(q.shape[2], k.shape[2], args.frame_tokens, 3), triton)
    start = time.perf_counter()
    triton.range_attention(q, k, v, starts, ends, None)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def check_tuning_cache(args: argparse.Namespace) -> dict:
    """The first call in a fresh process with an empty cache file, then again in another fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "FKV_TUNING_CACHE": str(Path(tmp) / "tuning.json")}
        argv = [sys.executable, __file__, "--first-call", "--device", args.device, "--frame-tokens",
                str(args.frame_tokens), "--heads", str(args.heads), "--head-dim", str(args.head_dim)]
        seconds = [float(subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout.split()[-1])
                   for _ in range(2)]
        entries = json.loads((Path(tmp) / "tuning.json").read_text())["entries"] if (Path(tmp) / "tuning.json").exists() else []
    result = {"first_call_empty_cache_s": seconds[0], "first_call_cached_s": seconds[1], "entries": len(entries)}
    print(f"autotune cache: first call {seconds[0]:.2f} s with an empty cache, {seconds[1]:.2f} s from the cache "
          f"({len(entries)} entries written)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--frame-tokens", type=int, default=1560)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--first-call", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU (or --device cpu with TRITON_INTERPRET=1 for a dry run)")
    if args.first_call:
        print(_one_call(args))
        return
    rows = check_kernels(args.frame_tokens, args.heads, args.head_dim, args.device)
    tuning = check_tuning_cache(args)
    name = f"gpu/check_F{args.frame_tokens}" if args.device == "cuda" else f"gpu_check_dry_run_F{args.frame_tokens}"
    device = torch.cuda.get_device_name() if args.device == "cuda" else "triton-interpreter"
    print(f"wrote {write_results(name, {'device': device, 'args': vars(args), 'rows': rows, 'tuning': tuning})}")
    failed = [r for r in rows if not r["ok"]]
    if failed:
        sys.exit(f"{len(failed)} of {len(rows)} kernel checks exceed their budget")


if __name__ == "__main__":
    main()
