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
from .semantics import COSINE_EPS, WindowLayout, fixed_scores, window_layout

__all__ = ["KeptTokens", "compressed_attention", "selected_segment_tokens"]


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
    first_candidate: int
    num_candidates: int


@functools.lru_cache(maxsize=256)
def _role_tables(layout: WindowLayout, p: RoleParams, device: torch.device) -> _RoleTables:
    fixed = [t for frames in (layout.sink(p), layout.recent(p), layout.current()) for t in layout.tokens(frames)]
    cands = layout.candidates(p)
    return _RoleTables(torch.tensor(fixed, dtype=torch.long, device=device), cands.start, len(cands))


@dataclass(frozen=True)
class _SegmentTables:
    """Segments of ``nc`` consecutive candidate frames, positions relative to the first."""

    start: torch.Tensor  # [nc * P] first token of every segment, frame-major
    length: torch.Tensor  # [nc * P]
    average: torch.Tensor  # [F, P] float32: column j averages the tokens of segment j
    max_length: int


@functools.lru_cache(maxsize=256)
def _segment_tables(frame_tokens: int, segments: int, num_candidates: int, device: torch.device) -> _SegmentTables:
    bounds = torch.arange(segments + 1) * frame_tokens // segments
    starts, lens = bounds[:-1], bounds[1:] - bounds[:-1]
    seg_of_token = torch.bucketize(torch.arange(frame_tokens), bounds[1:], right=True)
    average = F.one_hot(seg_of_token, segments).float() / lens.float()
    frame_offsets = torch.arange(num_candidates)[:, None] * frame_tokens
    return _SegmentTables(
        start=(frame_offsets + starts[None, :]).flatten().to(device),
        length=lens.repeat(num_candidates).to(device),
        average=average.to(device),
        max_length=int(lens.max()),
    )


def region_similarity(region: torch.Tensor, frame_tokens: int, segments: int, num_candidates: int,
                      per_head: bool) -> torch.Tensor:
    """Similarity ``[B, G, nc * P]`` (fp32, frame-major) of the ``nc`` candidate frames at the start of
    ``region`` ``[B, Hd, (nc + 1) * F, D]`` (the frame after the last included); ``G`` = Hd per head, else 1."""
    f, nc = frame_tokens, num_candidates
    tables = _segment_tables(f, segments, nc, region.device)
    win = region.float()
    if per_head:
        x = win.unflatten(2, (nc + 1, f))  # [B, G=Hd, nc + 1, F, D]
    else:
        x = win.permute(0, 2, 1, 3).flatten(2).unflatten(1, (nc + 1, f)).unsqueeze(1)  # [B, 1, nc+1, F, Hd*D]
    here, nxt = x[:, :, :-1], x[:, :, 1:]
    norms = x.norm(dim=-1).clamp_min(COSINE_EPS)
    cos = (here * nxt).sum(-1) / (norms[:, :, :-1] * norms[:, :, 1:])  # [B, G, nc, F]
    return (cos @ tables.average).flatten(2)


def lowest_segments(sim: torch.Tensor, p: RoleParams) -> torch.Tensor:
    """The keep rule's choice: indices ``[B, G, k]`` of the ``k`` lowest similarities, ties to the lower index."""
    count = min(p.selected_segments, sim.shape[-1])
    return torch.sort(sim, dim=-1, stable=True).indices[..., :count]


def segment_tokens(
    chosen: torch.Tensor, p: RoleParams, frame_tokens: int, num_candidates: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token positions ``[B, G, k * max_seg_len]`` of the segments ``chosen`` (frame-major indices into
    ``nc`` candidate frames) and their validity mask (``None`` when every segment has the same length)."""
    tables = _segment_tables(frame_tokens, p.segments_per_frame, num_candidates, chosen.device)
    offs = torch.arange(tables.max_length, device=chosen.device)
    tokens = tables.start[chosen][..., None] + offs  # [B, G, k, Lseg]
    valid = offs < tables.length[chosen][..., None]
    tokens = torch.where(valid, tokens, 0).flatten(2)
    return tokens, (None if bool(valid.all()) else valid.flatten(2))


def selected_segment_tokens(
    region: torch.Tensor, p: RoleParams, frame_tokens: int, num_candidates: int, per_head: bool, choice: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The keep rule's selected tokens of the candidate frames at the start of ``region`` (see
    :func:`region_similarity` and :func:`segment_tokens`)."""
    groups = region.shape[1] if per_head else 1
    sim = fixed_scores(choice, p, num_candidates, region.shape[0], groups, region.device)
    if sim is None:
        sim = region_similarity(region, frame_tokens, p.segments_per_frame, num_candidates, per_head)
    return segment_tokens(lowest_segments(sim, p), p, frame_tokens, num_candidates)


def _role_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: torch.Tensor,
    tables: _RoleTables,
    p: RoleParams,
    layout: WindowLayout,
    selection: str,
    choice: str,
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
    f = layout.frame_tokens
    start = tables.first_candidate * f
    region = k[:, heads, start : start + (tables.num_candidates + 1) * f]
    sel, valid = selected_segment_tokens(region, p, f, tables.num_candidates, selection == "head", choice)
    tokens = torch.cat([tables.fixed.expand(b, sel.shape[1], -1), sel + start], dim=-1)  # [B, G, T]
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
    triton: bool = False,
) -> tuple[torch.Tensor, KeptTokens]:
    """Attention of every head over the tokens its role keeps in the dense window.

    q: ``[B, H, Lq, D]``, k and v: ``[B, H, Lk, D]`` (any strides); returns ``[B, H, Lq, D]`` and
    the kept-token counts. A call that does not fit the plan's geometry runs dense. ``triton``: one
    range-attention kernel launch over all heads (:mod:`fkv_compile.kernels`) instead of gather + SDPA.
    """
    num_heads, lq, lk = q.shape[1], q.shape[2], k.shape[2]
    roles = plan.roles[layer]
    layout = window_layout(lq, lk, plan.frame_tokens, plan.chunk_frames)
    if layout is None or all(r == "dense" for r in roles):
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return out, KeptTokens(kept=(float(lk),) * num_heads, window=lk, layout_fits=layout is not None)
    if triton:
        from .kernels.attention import range_attention
        from .kernels.ranges import select_ranges

        starts, ends = select_ranges(k, plan, layer, layout)
        kept_per_head = (ends - starts).sum(-1).double().mean(0)
        out = range_attention(q, k, v, starts, ends, scale)
        return out, KeptTokens(kept=tuple(kept_per_head.tolist()), window=lk, layout_fits=True)
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
            q, k, v, heads, tables, p, layout, plan.selection, plan.segment_choice, role == "dynamic", scale
        )
        out[:, heads] = group_out
        for h, count in zip(head_list, group_kept):
            kept[h] = count
    return out, KeptTokens(kept=tuple(kept), window=lk, layout_fits=True)
