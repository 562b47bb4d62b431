"""An AR attention stack whose heads have planted roles, to check that the profiler recovers them.

Each head reserves the last dim of its queries and keys for a recency term: keys carry their
absolute frame index there (stored in the cache like RoPE positions), queries a per-head slope.
The score ``q . k`` then grows by ``slope * frame`` and the softmax weight of a key frame by
``exp(slope * frame / sqrt(D))`` relative to the frame before: a large slope makes a head put
its mass on the newest frames (a planted ``static`` head), slope 0 spreads it over the whole
window (a planted ``dynamic`` head). The cache is a dict per layer allocated by the caller, written
at absolute slots (CausVid style) and attended over up to the current chunk with SDPA.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PlantedConfig", "PlantedAttentionStack", "planted_caches", "planted_rollout"]


@dataclass(frozen=True)
class PlantedConfig:
    roles: tuple[tuple[str, ...], ...]  # roles[layer][head]: "static" or "dynamic"
    head_dim: int = 32
    frame_tokens: int = 8
    chunk_frames: int = 3
    num_frames: int = 15
    static_frame_logit: float = 3.0  # log of the weight ratio between consecutive frames for static heads

    @property
    def num_layers(self) -> int:
        return len(self.roles)

    @property
    def num_heads(self) -> int:
        return len(self.roles[0])

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim


class PlantedAttention(nn.Module):
    def __init__(self, cfg: PlantedConfig, roles: Sequence[str]):
        super().__init__()
        self.cfg = cfg
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        for lin in (self.q, self.k):  # a weak content term, so that the planted recency dominates
            nn.init.normal_(lin.weight, std=0.1 / math.sqrt(cfg.dim))
        slope = [cfg.static_frame_logit * math.sqrt(cfg.head_dim) if r == "static" else 0.0 for r in roles]
        self.register_buffer("slope", torch.tensor(slope))

    def forward(self, x: torch.Tensor, kv_cache: dict, current_start: int) -> torch.Tensor:
        cfg = self.cfg
        b, s, _ = x.shape
        shape = (b, s, cfg.num_heads, cfg.head_dim)
        q, k, v = self.q(x).view(shape).clone(), self.k(x).view(shape).clone(), self.v(x).view(shape)
        frames = (current_start + torch.arange(s, device=x.device)) // cfg.frame_tokens
        q[..., -1] = self.slope.to(q.dtype)
        k[..., -1] = frames[None, :, None].to(k.dtype)
        end = current_start + s
        kv_cache["k"][:, current_start:end] = k
        kv_cache["v"][:, current_start:end] = v
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), kv_cache["k"][:, :end].transpose(1, 2), kv_cache["v"][:, :end].transpose(1, 2)
        ).transpose(1, 2)
        return x + self.o(out.flatten(2))


class PlantedAttentionStack(nn.Module):
    """``forward(x [B, chunk tokens, dim], kv_cache, current_start)``: one attention layer per plan row."""

    def __init__(self, cfg: PlantedConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(PlantedAttention(cfg, row) for row in cfg.roles)

    def forward(self, x: torch.Tensor, kv_cache: list[dict], current_start: int) -> torch.Tensor:
        for layer, cache in zip(self.layers, kv_cache):
            x = layer(x, cache, current_start)
        return x


def planted_caches(cfg: PlantedConfig, batch: int = 1) -> list[dict]:
    shape = (batch, cfg.num_frames * cfg.frame_tokens, cfg.num_heads, cfg.head_dim)
    return [
        {"k": torch.zeros(shape), "v": torch.zeros(shape)} for _ in range(cfg.num_layers)
    ]


@torch.no_grad()
def planted_rollout(
    model: nn.Module, cfg: PlantedConfig, *, seed: int, steps: int = 2, batch: int = 1,
    on_chunk: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """``num_frames / chunk_frames`` chunks of ``steps`` forwards each on random inputs, tagged for profiling."""
    from ..modes.profile import tag

    gen = torch.Generator().manual_seed(seed)
    caches = planted_caches(cfg, batch)
    tokens = cfg.chunk_frames * cfg.frame_tokens
    outputs = []
    for chunk in range(cfg.num_frames // cfg.chunk_frames):
        for step in range(steps):
            x = torch.randn(batch, tokens, cfg.dim, generator=gen)
            with tag(chunk=chunk, step=step):
                outputs.append(model(x, caches, chunk * tokens))
        if on_chunk is not None:
            on_chunk(chunk)
    return outputs
