"""Whole-rollout time of the Self Forcing-style miniature: ``backend="inductor"`` vs ``forcing_kv`` (select).

Both are compiled, warmed up with one full video (compiles, automatic-dynamic recompiles), then
timed over further videos side by side. Sizes default to a CPU-scaled Self Forcing: 390 tokens per
frame (latent 26 x 60, 1/4 of 480p), global attention over 21 frames, heads of 128 dims.

    python benchmarks/rollout.py [--layers 4] [--heads 6] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import median_seconds, write_results

import fkv_compile
from fkv_compile import HeadPlan
from fkv_compile.models import MiniConfig, build, make_inputs, rollout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--latent", type=int, nargs=2, default=(26, 60), metavar=("H", "W"))
    parser.add_argument("--frames", type=int, default=21)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    cfg = MiniConfig(dim=128 * args.heads, num_heads=args.heads, num_layers=args.layers, ffn_dim=4 * 128 * args.heads,
                     latent_height=args.latent[0], latent_width=args.latent[1], num_frames=args.frames)
    chunks = args.frames // cfg.chunk_frames
    model = build(cfg, dtype=dtype)
    inputs = make_inputs(cfg, chunks=chunks, dtype=dtype)
    # alternate static and dynamic heads, as the reference plans roughly do (37% static on Self Forcing)
    plan = HeadPlan.from_roles([["static" if (h + layer) % 3 == 0 else "dynamic" for h in range(args.heads)]
                                for layer in range(args.layers)], frame_tokens=cfg.frame_tokens, chunk_frames=3)
    results = {}
    for name, backend, options in (("inductor", "inductor", None),
                                   ("forcing_kv select", "forcing_kv", {"plan": plan, "mode": "select"})):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, options=options)
        start = time.perf_counter()
        rollout(compiled, cfg, inputs)
        warmup = time.perf_counter() - start
        seconds = median_seconds(lambda: rollout(compiled, cfg, inputs), repeats=args.repeats, warmup=0)
        results[name] = {"first_video_s": warmup, "video_s": seconds}
        print(f"{name:<20} first video (compiles) {warmup:7.1f} s   video {seconds:7.2f} s")
        if backend == "forcing_kv":
            rows = fkv_compile.report(compiled, print_table=False).layers
            results[name]["kept_ratio_last_chunk"] = sum(r.kept_ratio for r in rows) / len(rows)
    ratio = results["forcing_kv select"]["video_s"] / results["inductor"]["video_s"]
    print(f"rollout time ratio select / inductor: {ratio:.3f}  (speed-up {1 / ratio:.2f}x), "
          f"{chunks} chunks x 5 forwards, {cfg.frame_tokens} tokens/frame, {args.layers} layers x {args.heads} heads")
    path = write_results(f"rollout_cpu_{args.dtype}_F{cfg.frame_tokens}",
                         {"args": vars(args), "results": results, "time_ratio": ratio})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
