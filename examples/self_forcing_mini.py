"""What fkv-compile does to a Self Forcing-style model, on a CPU, in about three minutes.

The model is the project's Self Forcing miniature at the rollout benchmark's scaled 480p geometry (390 tokens per
latent frame: real 480p with the latent sides halved; 21 frames, global attention, 3-frame chunks, 4 denoising
steps + 1 clean pass per chunk), 2 layers of 4 heads x 128, random weights, with a plan that makes 37% of the
heads static as the reference Self Forcing plan does.

First the facts no machine can change: the key tokens each attention call keeps, over one call and over a whole
video, and the KV bytes the ``compact`` store holds against the dense cache. Then the time: dense (plain
``backend="inductor"``) and ``backend="forcing_kv"`` in ``compact`` mode, each in its own process, one video each
in turns, round after round, so that a busy machine slows both alike; the ratio is the median of the same-round
ratios, printed beside the best the kept tokens allow (Amdahl: only attention shrinks).

    python examples/self_forcing_mini.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import logging

from fkv_compile.plan import STATIC
from fkv_compile.semantics import kept_token_count
from fkv_compile.tools.bench import (GEOMETRIES, BenchSettings, alternating_rollouts, amdahl, kept_fraction,
                                     paired_ratio, saving_in_words)
from fkv_compile.tools.progress import Progress
from fkv_compile.tools.roofline import MODELS, predictions

MIB = 2**20


def demo_settings(rounds: int) -> BenchSettings:
    """The benchmark's Self Forcing geometry at half the latent side, with fewer and narrower layers than the bench's
    default so that attention weighs as at real size (more than half of a dense video) and a CPU runs it in minutes."""
    return BenchSettings(geometry="self-forcing-5s", side=2, layers=2, heads=4, repeats=rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="timed videos per mode, in turns (default 4)")
    args = parser.parse_args()
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # the models' graph breaks are expected
    s = demo_settings(args.rounds)
    cfg, geometry = s.config(), GEOMETRIES[s.geometry]
    plan = s.head_plan(cfg)
    f, frames = cfg.frame_tokens, cfg.cache_frames  # the last chunk's window: the whole video under global attention
    print(f"Self Forcing miniature: {cfg.num_layers} layers x {cfg.num_heads} heads x {cfg.head_dim}, {f} tokens per "
          f"frame, {geometry.chunks} chunks of {cfg.chunk_frames} frames, attention over up to {frames} frames; "
          f"{plan.count(STATIC)} of {plan.num_layers * plan.num_heads} heads static")

    print("\n1. What each attention call attends to (the plan decides; no timing involved)")
    per_role = {role: kept_token_count(plan, role, frames) for role in ("static", "dynamic")}
    dense_tokens = frames * f
    print(f"   last chunk, {dense_tokens} key tokens per head dense: a static head keeps {per_role['static']:.0f} "
          f"({per_role['static'] / dense_tokens:.0%}), a dynamic head {per_role['dynamic']:.0f} "
          f"({per_role['dynamic'] / dense_tokens:.0%})")
    kept = kept_fraction(plan, geometry.window_frames, geometry.chunks)
    print(f"   whole video (the first chunks keep everything: nothing to drop yet): {kept:.1%} of the dense "
          f"attention work")

    print("\n2. Memory and time, dense vs compact (each compiled in its own process, then one video each in turns)")
    with Progress(2 + args.rounds, "   compiling, then timing") as bar:
        rollouts, rounds = alternating_rollouts(s, ("dense", "compact"), bar.advance)
    dense, compact = rollouts["dense"], rollouts["compact"]
    print(f"   KV cache: dense {dense['kv_bytes'] / MIB:.1f} MiB, compact store {compact['kv_bytes'] / MIB:.1f} MiB "
          f"({compact['kv_bytes'] / dense['kv_bytes']:.0%}; measured after the last chunk)")
    times = {mode: [r[mode] for r in rounds] for mode in ("dense", "compact")}
    ratio = paired_ratio(times, "compact", "dense")
    best = amdahl(ratio, dense["attention_share"], kept)
    print(f"   video time, compact / dense: {ratio:.3f}, {1 / ratio:.2f}x faster (median of {len(rounds)} same-round "
          "ratios: " + ", ".join(f"{c / d:.3f}" for c, d in zip(times["compact"], times["dense"]))
          + f"; dense {dense['video_s']:.1f} s per video)")
    print(f"   the best the kept tokens allow: {best['amdahl_limit']:.3f} (attention is {dense['attention_share']:.0%} "
          f"of the dense video, {kept:.0%} of it kept): "
          + saving_in_words(best["saving_realised"], 1 - best["amdahl_limit"], "the"))

    print("\n3. At real size (a model, not a measurement: docs/gpu_model.md)")
    for key, g in predictions()["geometries"].items():
        row = g["gpus"]["H100"]
        print(f"   {MODELS[key].name}: attention {row['attention_share_dense']:.0%} of a dense video on an H100, "
              f"predicted speed-up {row['speedup']['same_kernel_class']:.2f}x (paper: {g['paper_speedup']:.2f}x)")


if __name__ == "__main__":
    main()
