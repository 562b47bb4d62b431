"""The token ranges each head attends to, in the form :func:`range_attention` takes.

``select`` (:func:`select_ranges`): per head the sink frames, the selected segments and the recent
frames + current chunk (adjacent, one range) of the dense window, the segments chosen from the
similarity kernel's scores (or a baseline's fixed scores) by the keep rule. ``compact`` (:func:`mask_runs`): the runs of held
tokens a head group's store marks as attendable.

Shape legend: ``B`` batch, ``H`` heads, ``Lk`` window tokens, ``R`` ranges per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..plan import HeadPlan
from ..select import lowest_segments
from ..semantics import WindowLayout, fixed_scores
from .similarity import segment_similarity

__all__ = ["select_ranges", "mask_runs"]


def select_ranges(k: torch.Tensor, plan: HeadPlan, layer: int, layout: WindowLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept-token ranges ``starts, ends`` ``[B, H, R]`` (int32) of every head of ``layer`` in the window ``k``
    ``[B, H, Lk, D]``; empty ranges ``(0, 0)`` pad the shorter lists."""
    b, num_heads, lk, _ = k.shape
    f = layout.frame_tokens
    dyn = plan.heads(layer, "dynamic")
    p_dyn = plan.dynamic
    cands = layout.candidates(p_dyn)
    count = min(p_dyn.selected_segments, len(cands) * p_dyn.segments_per_frame) if dyn else 0
    starts = torch.zeros((b, num_heads, 2 + count), dtype=torch.int32, device=k.device)
    ends = torch.zeros_like(starts)
    for role in ("dense", "static", "dynamic"):
        heads = list(plan.heads(layer, role))
        if not heads:
            continue
        if role == "dense":
            ends[:, heads, 0] = lk
            continue
        p = plan.params(role)
        sink = layout.tokens(layout.sink(p))
        starts[:, heads, 0], ends[:, heads, 0] = sink.start, sink.stop
        starts[:, heads, 1] = min(layout.recent(p).start, layout.history) * f  # recent frames, then the chunk
        ends[:, heads, 1] = lk
        if role == "dynamic" and count:
            groups = torch.tensor([heads] if plan.selection == "layer" else [[h] for h in heads], device=k.device)
            sim = fixed_scores(plan.segment_choice, p, len(cands), b, groups.shape[0], k.device)
            if sim is None:
                sim = segment_similarity(k, groups, cands.start, len(cands), f, p.segments_per_frame)
            chosen = torch.sort(lowest_segments(sim, p), dim=-1).values  # in window order: K/V read forward
            first = (cands.start + chosen // p.segments_per_frame) * f
            j = chosen % p.segments_per_frame
            seg_start = first + j * f // p.segments_per_frame
            seg_end = first + (j + 1) * f // p.segments_per_frame
            starts[:, heads, 2:] = seg_start.expand(b, len(heads), -1).to(torch.int32)
            ends[:, heads, 2:] = seg_end.expand(b, len(heads), -1).to(torch.int32)
    return starts, ends


def mask_runs(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximal runs of ``True`` in ``mask`` ``[B, T]`` as ranges ``starts, ends`` ``[B, R]`` (int32),
    ``R`` the most runs of any row; rows with fewer runs are padded with ``(0, 0)``."""
    b, t = mask.shape
    edges = torch.diff(F.pad(mask.to(torch.int8), (1, 1)), dim=1)  # [B, T + 1]: +1 opens a run, -1 closes it
    pos = torch.arange(t + 1, device=mask.device).expand(b, -1)
    runs = int((edges == 1).sum(1).max()) if b else 0
    first_starts = torch.sort(torch.where(edges == 1, pos, t + 1), dim=1).values[:, :runs]
    first_ends = torch.sort(torch.where(edges == -1, pos, t + 1), dim=1).values[:, :runs]
    pad = first_starts > t
    return torch.where(pad, 0, first_starts).to(torch.int32), torch.where(pad, 0, first_ends).to(torch.int32)
