"""``select`` mode: attention over only the kept tokens of the model's own dense window.

The keep rule (:mod:`fkv_compile.semantics`) becomes per-head token ranges (:mod:`.ranges`), and one
``range_attention`` op (:mod:`.dispatch`: Triton on GPUs, torch on CPU) attends over them, so time
scales with kept tokens, not window length. A call that does not fit the plan's geometry runs dense.

Shape legend: ``B`` batch, ``H`` heads, ``Lq``/``Lk`` query/key tokens, ``D`` head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..plan import DENSE, HeadPlan
from ..semantics import window_layout
from .dispatch import TORCH, Kernels
from .ranges import select_ranges
from .sharding import HeadShard

__all__ = ["KeptTokens", "compressed_attention"]


@dataclass(frozen=True)
class KeptTokens:
    """Key tokens visited per head in one call, for the report: ``kept`` ``[H]`` float64 averaged over the batch,
    on the device (read by the report only, so the call does not wait for it)."""

    kept: torch.Tensor
    window: int
    layout_fits: bool


def compressed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: HeadPlan,
    layer: int,
    scale: float | None = None,
    kernels: Kernels = TORCH,
    shard: HeadShard | None = None,
) -> tuple[torch.Tensor, KeptTokens]:
    """Attention of every head over the tokens its role keeps in the dense window.

    q: ``[B, H, Lq, D]``, k and v: ``[B, H, Lk, D]`` (any strides); returns ``[B, H, Lq, D]`` and
    the kept-token counts. ``shard``: this rank's heads under head parallelism (``plan`` is their plan).
    """
    num_heads, lq, lk = q.shape[1], q.shape[2], k.shape[2]
    layout = window_layout(lq, lk, plan.frame_tokens, plan.chunk_frames)
    spans = shard is not None and shard.spans(layer)  # the other ranks wait for this one's similarity share
    if layout is None or (all(r == DENSE for r in plan.roles[layer]) and not spans):
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        kept = torch.full((num_heads,), float(lk), dtype=torch.float64, device=q.device)
        return out, KeptTokens(kept=kept, window=lk, layout_fits=layout is not None)
    starts, ends = select_ranges(k, plan, layer, layout, kernels, shard if spans else None)
    kept_per_head = (ends - starts).sum(-1).double().mean(0)
    out = kernels.range_attention(q, k, v, starts, ends, scale)
    return out, KeptTokens(kept=kept_per_head, window=lk, layout_fits=True)
