"""The token ranges each head attends to, in the form the ``range_attention`` op takes.

``select`` (:func:`select_ranges`): per head the sink frames, the selected segments and the recent
frames + current chunk (adjacent, one range) of the dense window; the segments are the keep rule's
lowest-``k`` (:mod:`fkv_compile.semantics`) of the ``segment_similarity`` op's scores, or of a
baseline's fixed scores. ``compact`` (:func:`mask_runs`): the runs of held tokens a head group's
store marks as attendable.

Shape legend: ``B`` batch, ``H`` heads, ``Lk`` window tokens, ``R`` ranges per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..plan import DENSE, DYNAMIC, ROLES, HeadPlan
from ..semantics import WindowLayout, fixed_scores, lowest_segments, segment_table, selected_count
from .dispatch import Kernels
from .sharding import HeadShard

__all__ = ["select_ranges", "selection_groups", "mask_runs"]


def selection_groups(heads: tuple[int, ...], selection: str, device: torch.device) -> torch.Tensor:
    """``[G, Hg]``: the heads each selection concatenates (all dynamic heads of a layer, or one each)."""
    return torch.tensor([list(heads)] if selection == "layer" else [[h] for h in heads], device=device)


def select_ranges(k: torch.Tensor, plan: HeadPlan, layer: int, layout: WindowLayout, kernels: Kernels,
                  shard: HeadShard | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept-token ranges ``starts, ends`` ``[B, H, R]`` (int64) of every head of ``layer`` in the window ``k``
    ``[B, H, Lk, D]``; empty ranges ``(0, 0)`` pad the shorter lists. ``shard``: the layer's selection spans
    ranks (:mod:`.sharding`): the similarity is all-reduced, also when this rank holds no dynamic head."""
    b, num_heads, lk, _ = k.shape
    f = layout.frame_tokens
    dyn = plan.heads(layer, DYNAMIC)
    p_dyn = plan.dynamic
    cands = layout.candidates(p_dyn)
    available = selected_count(p_dyn, len(cands) * p_dyn.segments_per_frame)
    if shard is not None and not dyn and available:
        shard.layer_similarity(k, dyn, cands.start, len(cands), f, p_dyn.segments_per_frame)  # this rank's zeros
    count = available if dyn else 0
    starts = torch.zeros((b, num_heads, 2 + count), dtype=torch.long, device=k.device)
    ends = torch.zeros_like(starts)
    for role in ROLES:
        heads = list(plan.heads(layer, role))
        if not heads:
            continue
        if role == DENSE:
            ends[:, heads, 0] = lk
            continue
        p = plan.params(role)
        sink = layout.tokens(layout.sink(p))
        starts[:, heads, 0], ends[:, heads, 0] = sink.start, sink.stop
        starts[:, heads, 1] = min(layout.recent(p).start, layout.history) * f  # recent frames, then the chunk
        ends[:, heads, 1] = lk
        if role == DYNAMIC and count:
            groups = selection_groups(tuple(heads), plan.selection, k.device)
            scores = fixed_scores(plan.segment_choice, p, len(cands), b, groups.shape[0], k.device)
            if scores is None and shard is not None:
                scores = shard.layer_similarity(k, tuple(heads), cands.start, len(cands), f, p.segments_per_frame)
            elif scores is None:
                scores = kernels.segment_similarity(k, groups, cands.start, len(cands), f, p.segments_per_frame)
            chosen = lowest_segments(scores, p)  # [B, G, k] in window order: K/V read forward
            table = segment_table(f, p.segments_per_frame, len(cands), k.device)
            first = cands.start * f
            starts[:, heads, 2:] = (first + table.start[chosen]).expand(b, len(heads), -1)
            ends[:, heads, 2:] = (first + table.end[chosen]).expand(b, len(heads), -1)
    return starts, ends


def mask_runs(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximal runs of ``True`` in ``mask`` ``[B, T]`` as ranges ``starts, ends`` ``[B, R]`` (int64),
    ``R`` the most runs of any row; rows with fewer runs are padded with ``(0, 0)``."""
    b, t = mask.shape
    edges = torch.diff(F.pad(mask.to(torch.int8), (1, 1)), dim=1)  # [B, T + 1]: +1 opens a run, -1 closes it
    pos = torch.arange(t + 1, device=mask.device).expand(b, -1)
    runs = int((edges == 1).sum(1).max()) if b else 0
    first_starts = torch.sort(torch.where(edges == 1, pos, t + 1), dim=1).values[:, :runs]
    first_ends = torch.sort(torch.where(edges == -1, pos, t + 1), dim=1).values[:, :runs]
    pad = first_starts > t
    return torch.where(pad, 0, first_starts), torch.where(pad, 0, first_ends)
