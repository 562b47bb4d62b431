"""What self-calibration costs: the calibration video (dense + frame-mass recording) vs ``mode="off"``, side by side.

    python benchmarks/calibration.py [--lowering inductor] [--repeats 3]

Three compiles of the windowed miniature, one after another in one process, each timed after a warm-up
video: ``off``; calibration that never ends (every video runs dense and records); no options (the
warm-up video calibrates, the timed ones compress). Median seconds per video.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

import fkv_compile
from fkv_compile.models import MiniConfig, build, make_inputs, rollout


def _video_seconds(model: torch.nn.Module, cfg: MiniConfig, inputs) -> float:
    start = time.perf_counter()
    rollout(model, cfg, inputs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lowering", default="aot_eager", choices=("aot_eager", "inductor"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    cfg = MiniConfig(dim=512, num_heads=4, num_layers=4, ffn_dim=1024, latent_height=16, latent_width=24,
                     window_frames=12, sink_frames=3)
    model = build(cfg)
    first, second = make_inputs(cfg, chunks=8), make_inputs(cfg, chunks=8, seed=1)
    runs = {  # name: (options, warm-up video, timed video)
        "off": ({"mode": "off"}, first, first),
        "calibrating": ({"calibration": {"chunks": 10**9}}, first, first),  # never ends: every video calibrates
        "compressed": ({}, first, second),  # the first video calibrates, the next ones compress
    }
    times: dict[str, list[float]] = {}
    for name, (options, warm_up, timed) in runs.items():
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="forcing_kv", options={"lowering": args.lowering, **options})
        rollout(compiled, cfg, warm_up)
        times[name] = [_video_seconds(compiled, cfg, timed) for _ in range(args.repeats)]
    plan = fkv_compile.plan_of(compiled)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    plan = fkv_compile.plan_of(compiled)
    print(f"windowed miniature ({cfg.num_layers} layers x {cfg.num_heads} heads, {cfg.frame_tokens} tokens/frame, "
          f"8 chunks), lowering {args.lowering}, median of {args.repeats}:")
    for name, seconds in median.items():
        print(f"  {name:>12}: {seconds:6.2f} s per video ({seconds / median['off']:.3f} of off)")
    print(f"  calibrated plan: {plan.count('static')} static, {plan.count('dynamic')} dynamic heads")


if __name__ == "__main__":
    main()
