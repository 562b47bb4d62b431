"""Head parallelism (Ulysses): the per-rank imbalance of a plan, and the cost of the layer selection's all-reduce.

1. Kept key tokens per rank of the reference Self Forcing plan (30 layers x 12 heads) at its 21-frame window
   for N = 2, 3, 4, 6 ranks (``semantics.rank_costs``, as ``fkv plan show --ranks N``): every layer waits for
   its slowest rank at the all-to-all after attention.
2. The all-reduce a layer-level selection adds: one per layer with dynamic heads and chunk (``select`` chooses once
   per chunk where the graph writes the cache itself, at every call elsewhere; ``compact`` once per commit), of
   ``B (2 nc + 1) F`` float32 sums. Timed on ``N`` spawned ranks (gloo on CPU, NCCL
   with ``--device cuda`` and N GPUs) at real size (1560 tokens per frame, 3 candidate frames, batch 1), and
   counted on a 2-rank rollout of the Ulysses miniature (the report's counter) to check the calls per chunk.

    python benchmarks/ulysses.py                 # CPU, gloo, 2 and 3 ranks
    python benchmarks/ulysses.py --device cuda   # NCCL (needs as many GPUs as ranks)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import write_results

from fkv_compile.bundled import bundled_plan
from fkv_compile.plan import DYNAMIC
from fkv_compile.semantics import rank_costs

FORWARDS_PER_CHUNK = 5  # Self Forcing: 4 denoising steps and the clean pass: a select that cannot reuse reduces at each
WINDOW_FRAMES = 21


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world_size: int, port: int, backend: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))


def _time_all_reduce(rank: int, world_size: int, port: int, device: str, numel: int, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    _init(rank, world_size, port, "nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(rank)
    sums = torch.randn(numel, device=device)
    times = []
    for i in range(repeats + 10):
        dist.barrier()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dist.all_reduce(sums)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 10:  # warm-up
            times.append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(str(statistics.median(times)))
    dist.destroy_process_group()


def _count_calls(rank: int, world_size: int, port: int, chunks: int, out: str) -> None:
    torch.set_num_threads(1)
    _init(rank, world_size, port, "gloo")
    import fkv_compile
    from fkv_compile import HeadPlan
    from fkv_compile.models import MiniConfig, build, make_inputs, rollout

    cfg = MiniConfig(dim=96, num_heads=6, num_layers=2, ffn_dim=96, window_frames=12, sink_frames=3,
                     sequence_parallel=world_size)
    plan = HeadPlan.from_roles([["static", "dynamic"] * 3] * 2, frame_tokens=cfg.frame_tokens, chunk_frames=3)
    counts = {}
    for mode in ("select", "compact"):
        torch._dynamo.reset()
        compiled = torch.compile(build(cfg), backend="forcing_kv",
                                 options={"plan": plan, "mode": mode, "lowering": "aot_eager"})
        rollout(compiled, cfg, make_inputs(cfg, chunks=chunks))
        shard = fkv_compile.report(compiled, print_table=False).shard
        counts[mode] = (shard.reduce_calls, shard.reduce_bytes)
    if rank == 0:
        Path(out).write_text(json.dumps(counts))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()

    plan = bundled_plan("self-forcing")
    imbalance = {}
    for n in (2, 3, 4, 6):
        costs = rank_costs(plan, plan.shard_heads(n), WINDOW_FRAMES)
        imbalance[n] = {"kept_tokens_per_rank": list(costs.per_rank()), "imbalance": costs.imbalance}
        print(f"self-forcing plan over {n} ranks: imbalance {costs.imbalance:.3f}, key tokens per chunk by rank "
              f"{[round(k) for k in costs.per_rank()]}")

    p = plan.dynamic
    numel = (2 * p.candidate_frames + 1) * 1560  # batch 1, real-size frames
    layers = sum(bool(plan.heads(layer, DYNAMIC)) for layer in range(plan.num_layers))
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.ranks:
            out = str(Path(tmp) / f"allreduce{n}")
            mp.spawn(_time_all_reduce, args=(n, _port(), args.device, numel, args.repeats, out), nprocs=n)
            seconds = float(Path(out).read_text())
            timings[n] = {"seconds_per_call": seconds,
                          "select_ms_per_chunk": 1e3 * seconds * layers,
                          "select_ms_per_chunk_without_reuse": 1e3 * seconds * layers * FORWARDS_PER_CHUNK,
                          "compact_ms_per_chunk": 1e3 * seconds * layers}
            print(f"{n} ranks ({args.device}): all-reduce of {4 * numel:,} bytes {1e6 * seconds:.0f} us; per chunk "
                  f"({layers} layers with dynamic heads): select {timings[n]['select_ms_per_chunk']:.1f} ms "
                  f"({timings[n]['select_ms_per_chunk_without_reuse']:.1f} ms where it cannot reuse: "
                  f"{layers * FORWARDS_PER_CHUNK} calls), compact {timings[n]['compact_ms_per_chunk']:.1f} ms")
        out = str(Path(tmp) / "counts")
        chunks = 5
        mp.spawn(_count_calls, args=(2, _port(), chunks, out), nprocs=2)
        counts = json.loads(Path(out).read_text())
    print(f"miniature, 2 ranks, 2 layers with dynamic heads, {chunks} chunks: all-reduces (calls, bytes) {counts}")
    write_results(f"ulysses_{args.device}", {
        "plan": "self-forcing", "window_frames": WINDOW_FRAMES, "imbalance": imbalance,
        "all_reduce": {"bytes": 4 * numel, "layers_with_dynamic_heads": layers,
                       "forwards_per_chunk": FORWARDS_PER_CHUNK, "by_ranks": timings},
        "miniature_counts": {"chunks": chunks, "layers": 2, **counts},
    })


if __name__ == "__main__":
    main()
