"""Compressed attention in torch: visit only the kept tokens of the dense window (``select`` mode, CPU).

Heads are grouped by role; each group gathers its kept K/V tokens into a compact tensor and runs
one SDPA call over them, so time scales with kept tokens, not window length. This implements the
keep rule of :mod:`fkv_compile.semantics` independently (vectorized, no per-segment loops) and is
tested against it.

Shape legend: ``B`` batch, ``H`` heads, ``Lq``/``Lk`` query/key tokens, ``D`` head dim,
``F`` tokens per frame, ``P`` segments per frame, ``G`` independent selections.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .plan import HeadPlan, RoleParams
from .semantics import COSINE_EPS, WindowLayout, window_layout

__all__ = ["KeptTokens", "compressed_attention"]


@dataclass(frozen=True)
class KeptTokens:
    """Key tokens visited per head in one call, for the report (``kept`` averaged over the batch)."""

    kept: tuple[float, ...]
    window: int
    layout_fits: bool


@dataclass(frozen=True)
class _RoleTables:
    """Geometry-only index tables of one role, built once per window shape and reused by every layer."""

    fixed: torch.Tensor  # [T] token positions every head of the role keeps (sink, recent, chunk)
    seg_start: torch.Tensor  # [Nc * P] first token of every candidate segment, frame-major
    seg_len: torch.Tensor  # [Nc * P]
    seg_avg: torch.Tensor  # [F, P] float32: column j averages the tokens of segment j
    first_candidate: int
    num_candidates: int
    max_seg_len: int


@functools.lru_cache(maxsize=256)
def _role_tables(layout: WindowLayout, p: RoleParams, device: torch.device) -> _RoleTables:
    f = layout.frame_tokens
    fixed = [t for frames in (layout.sink(p), layout.recent(p), layout.current()) for t in layout.tokens(frames)]
    cands = layout.candidates(p)
    bounds = torch.arange(p.segments_per_frame + 1) * f // p.segments_per_frame
    starts, lens = bounds[:-1], bounds[1:] - bounds[:-1]
    seg_of_token = torch.bucketize(torch.arange(f), bounds[1:], right=True)
    seg_avg = F.one_hot(seg_of_token, p.segments_per_frame).float() / lens.float()
    frame_offsets = torch.tensor(list(cands), dtype=torch.long) * f
    return _RoleTables(
        fixed=torch.tensor(fixed, dtype=torch.long, device=device),
        seg_start=(frame_offsets[:, None] + starts[None, :]).flatten().to(device),
        seg_len=lens.repeat(len(cands)).to(device),
        seg_avg=seg_avg.to(device),
        first_candidate=cands.start,
        num_candidates=len(cands),
        max_seg_len=int(lens.max()),
    )


def _selected_tokens(
    k: torch.Tensor, heads: torch.Tensor, tables: _RoleTables, p: RoleParams, layout: WindowLayout, per_head: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token positions ``[B, G, k * max_seg_len]`` of the selected segments and their validity mask."""
    f, nc = layout.frame_tokens, tables.num_candidates
    b = k.shape[0]
    start = tables.first_candidate * f
    win = k[:, heads, start : start + (nc + 1) * f].float()  # candidates and the frame after the last
    if per_head:
        x = win.unflatten(2, (nc + 1, f))  # [B, G=Hd, nc + 1, F, D]
    else:
        x = win.permute(0, 2, 1, 3).flatten(2).unflatten(1, (nc + 1, f)).unsqueeze(1)  # [B, 1, nc+1, F, Hd*D]
    here, nxt = x[:, :, :-1], x[:, :, 1:]
    norms = x.norm(dim=-1).clamp_min(COSINE_EPS)
    cos = (here * nxt).sum(-1) / (norms[:, :, :-1] * norms[:, :, 1:])  # [B, G, nc, F]
    sim = (cos @ tables.seg_avg).flatten(2)  # [B, G, nc * P]
    count = min(p.selected_segments, sim.shape[-1])
    chosen = torch.sort(sim, dim=-1, stable=True).indices[..., :count]  # [B, G, k]
    offs = torch.arange(tables.max_seg_len, device=k.device)
    tokens = tables.seg_start[chosen][..., None] + offs  # [B, G, k, Lseg]
    valid = offs < tables.seg_len[chosen][..., None]
    tokens = torch.where(valid, tokens, tables.fixed[-1]).flatten(2)
    return tokens.expand(b, -1, -1), (None if bool(valid.all()) else valid.flatten(2))


def _role_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: torch.Tensor,
    tables: _RoleTables,
    p: RoleParams,
    layout: WindowLayout,
    selection: str,
    dynamic: bool,
    scale: float | None,
) -> tuple[torch.Tensor, list[float]]:
    """SDPA of one head group over its kept tokens; returns the output and kept tokens per head (batch mean)."""
    b = q.shape[0]
    qg = q[:, heads]
    if not dynamic or tables.num_candidates == 0 or p.selected_segments == 0:
        idx = (slice(None), heads[:, None], tables.fixed[None, :])
        kg, vg = k[idx], v[idx]
        return F.scaled_dot_product_attention(qg, kg, vg, scale=scale), [float(tables.fixed.numel())] * len(heads)
    sel, valid = _selected_tokens(k, heads, tables, p, layout, per_head=selection == "head")
    tokens = torch.cat([tables.fixed.expand(b, sel.shape[1], -1), sel], dim=-1)  # [B, G, T]
    bi = torch.arange(b, device=q.device)[:, None, None]
    hi = heads[None, :, None]
    kg, vg = k[bi, hi, tokens], v[bi, hi, tokens]  # [B, Hd, T, D]
    mask = None
    kept = [float(tokens.shape[-1])] * len(heads)
    if valid is not None:
        keep = torch.cat([torch.ones_like(tables.fixed, dtype=torch.bool).expand(b, valid.shape[1], -1), valid], -1)
        mask = keep[:, :, None, :].expand(b, len(heads), 1, -1)
        kept = keep.sum(-1).double().mean(0).expand(len(heads)).tolist()
    return F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale), kept


def compressed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: HeadPlan,
    layer: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, KeptTokens]:
    """Attention of every head over the tokens its role keeps in the dense window.

    q: ``[B, H, Lq, D]``, k and v: ``[B, H, Lk, D]`` (any strides); returns ``[B, H, Lq, D]`` and
    the kept-token counts. A call that does not fit the plan's geometry runs dense.
    """
    num_heads, lq, lk = q.shape[1], q.shape[2], k.shape[2]
    roles = plan.roles[layer]
    layout = window_layout(lq, lk, plan.frame_tokens, plan.chunk_frames)
    if layout is None or all(r == "dense" for r in roles):
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return out, KeptTokens(kept=(float(lk),) * num_heads, window=lk, layout_fits=layout is not None)
    out = q.new_empty(q.shape[:3] + v.shape[3:])
    kept = [float(lk)] * num_heads
    for role in ("dense", "static", "dynamic"):
        head_list = plan.heads(layer, role)
        if not head_list:
            continue
        heads = torch.tensor(head_list, dtype=torch.long, device=q.device)
        if role == "dense":
            out[:, heads] = F.scaled_dot_product_attention(q[:, heads], k[:, heads], v[:, heads], scale=scale)
            continue
        p = plan.params(role)
        tables = _role_tables(layout, p, q.device)
        group_out, group_kept = _role_attention(
            q, k, v, heads, tables, p, layout, plan.selection, role == "dynamic", scale
        )
        out[:, heads] = group_out
        for h, count in zip(head_list, group_kept):
            kept[h] = count
    return out, KeptTokens(kept=tuple(kept), window=lk, layout_fits=True)
