"""Self Forcing-style miniature, dense vs Forcing-KV (``select``), compiled with one line.

Builds the miniature (global attention over 21 latent frames, 3-frame chunks, 4 denoising steps +
1 clean pass per chunk) and compiles it with ``backend="inductor"`` and with ``backend="forcing_kv"``
and no options: the first video calibrates (dense, attention mass recorded), then the plan it made
compresses the next ones. Prints the report and the plan, and measures the attention-call and
rollout time ratios side by side.

    python examples/self_forcing_mini.py
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

import fkv_compile
from fkv_compile.models import MiniConfig, build, make_inputs, new_caches, rollout
from fkv_compile.modes.select import compressed_attention
from fkv_compile.tools.bench import median_seconds


def main() -> None:
    # the model's .item()/.tolist() graph breaks are expected (Self Forcing has them); keep the demo quiet
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    cfg = MiniConfig(dim=512, num_heads=4, num_layers=4, ffn_dim=1024, latent_height=16, latent_width=24)
    model = build(cfg)
    inputs = make_inputs(cfg, chunks=cfg.num_frames // cfg.chunk_frames)
    print(f"miniature: {cfg.num_layers} layers x {cfg.num_heads} heads x {cfg.head_dim}, {cfg.frame_tokens} tokens/frame, "
          f"{len(inputs.noise)} chunks of {cfg.chunk_frames} frames, global attention over {cfg.num_frames} frames")

    dense = torch.compile(model, backend="inductor")
    compressed = torch.compile(model, backend="forcing_kv")  # no plan: it calibrates itself on the first video
    for name, m in (("inductor", dense), ("forcing_kv", compressed)):
        start = time.perf_counter()
        rollout(m, cfg, inputs)
        print(f"{name:>10}: first video incl. compile {time.perf_counter() - start:.1f} s")
    print("forcing_kv calibrated on that video (dense, bit-identical outputs); the next videos compress")
    t_dense = median_seconds(lambda: rollout(dense, cfg, inputs), repeats=2)
    t_fkv = median_seconds(lambda: rollout(compressed, cfg, inputs), repeats=2)

    print()
    fkv_compile.report(compressed)
    plan = fkv_compile.plan_of(compressed)  # plan.save("plan.json"), then options={"plan": "plan.json"} next time
    scores = [f"{s:.2f}" for row in plan.provenance["scores"] for s in row]
    print(f"calibrated plan: {plan.count('static')} static, {plan.count('dynamic')} dynamic heads (scores {', '.join(scores)}; "
          "random weights spread attention, so heads come out dynamic)")

    # one attention call at the last chunk, on the keys and values the model really cached
    kv, cross = new_caches(cfg, batch=1, dtype=torch.float32)
    rollout(model, cfg, inputs, caches=(kv, cross))
    k, v = kv[1]["k"].transpose(1, 2), kv[1]["v"].transpose(1, 2)
    q = torch.randn(1, cfg.num_heads, cfg.chunk_frames * cfg.frame_tokens, cfg.head_dim)
    _, kept = compressed_attention(q, k, v, plan, 1)
    a_dense = median_seconds(lambda: F.scaled_dot_product_attention(q, k, v), repeats=20)
    a_fkv = median_seconds(lambda: compressed_attention(q, k, v, plan, 1), repeats=20)
    token_ratio = sum(kept.kept) / (len(kept.kept) * kept.window)
    print()
    print(f"attention call, last chunk (Lq={q.shape[2]}, Lk={k.shape[2]}): select/dense time {a_fkv / a_dense:.3f}, "
          f"kept/dense tokens {token_ratio:.3f} (the limit)")
    print(f"rollout: forcing_kv/inductor time {t_fkv / t_dense:.3f} ({t_dense:.2f} s -> {t_fkv:.2f} s per video)")


if __name__ == "__main__":
    main()
