"""Self Forcing-style miniature, dense vs Forcing-KV (``select``), compiled with one line.

Builds the miniature (global attention over 21 latent frames, 3-frame chunks, 4 denoising steps +
1 clean pass per chunk), makes a head plan, runs the same video with ``backend="inductor"`` and
with ``backend="forcing_kv"``, prints the rewrite report, and measures the attention-call and
rollout time ratios side by side.

    python examples/self_forcing_mini.py
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

import fkv_compile
from fkv_compile import HeadPlan
from fkv_compile.models import MiniConfig, build, make_inputs, new_caches, rollout
from fkv_compile.modes.select import compressed_attention
from fkv_compile.tools.bench import median_seconds


def main() -> None:
    # the model's .item()/.tolist() graph breaks are expected (Self Forcing has them); keep the demo quiet
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    cfg = MiniConfig(dim=512, num_heads=4, num_layers=4, ffn_dim=1024, latent_height=16, latent_width=24)
    model = build(cfg)
    inputs = make_inputs(cfg, chunks=cfg.num_frames // cfg.chunk_frames)
    # heads alternate roles per layer; a real plan comes from profiling or the reference JSON
    plan = HeadPlan.from_roles(
        [["static" if (h + layer) % 2 == 0 else "dynamic" for h in range(cfg.num_heads)] for layer in range(cfg.num_layers)],
        frame_tokens=cfg.frame_tokens,
        chunk_frames=cfg.chunk_frames,
    )
    print(f"miniature: {cfg.num_layers} layers x {cfg.num_heads} heads x {cfg.head_dim}, {cfg.frame_tokens} tokens/frame, "
          f"{len(inputs.noise)} chunks of {cfg.chunk_frames} frames, global attention over {cfg.num_frames} frames")

    dense = torch.compile(model, backend="inductor")
    compressed = torch.compile(model, backend="forcing_kv", options={"plan": plan})
    for name, m in (("inductor", dense), ("forcing_kv", compressed)):
        start = time.perf_counter()
        rollout(m, cfg, inputs)
        print(f"{name:>10}: first video incl. compile {time.perf_counter() - start:.1f} s")
    t_dense = median_seconds(lambda: rollout(dense, cfg, inputs), repeats=2)
    t_fkv = median_seconds(lambda: rollout(compressed, cfg, inputs), repeats=2)

    print()
    fkv_compile.report(compressed)

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
