"""Baseline KV policies next to Forcing-KV's, as keep masks over one attention call's window.

Every policy of :data:`EQUAL_BUDGET` keeps exactly as many tokens per head as the keep rule's
``dynamic`` role (sink + recent + ``k`` segments + the current chunk), so that comparisons are at
equal KV budget:

- ``forcing-kv``: the keep rule's dynamic role: the ``k`` candidate segments least similar to the
  next frame (:mod:`fkv_compile.semantics`);
- ``random``: ``k`` candidate segments drawn at random (seeded);
- ``even``: ``k`` candidate segments evenly spaced over the candidates;
- ``streaming``: sink + the most recent history tokens, as many as the others keep (StreamingLLM,
  LongLive's sink + window), for every head.

``dummy-forcing`` (Dummy Forcing's three head groups: first frame, last chunk, latest frame only;
heads assigned round-robin) keeps fewer tokens and is reported with its own budget.

Shape legend: ``B`` batch, ``H`` heads, ``Lk`` window tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .plan import HeadPlan
from .semantics import WindowLayout, keep_mask, segment_bounds, window_layout

__all__ = ["POLICIES", "EQUAL_BUDGET", "policy_mask", "masked_attention", "gathered_attention"]

EQUAL_BUDGET: tuple[str, ...] = ("forcing-kv", "random", "even", "streaming")
POLICIES: tuple[str, ...] = EQUAL_BUDGET + ("dummy-forcing",)


def _fixed(layout: WindowLayout, plan: HeadPlan, lk: int) -> torch.Tensor:
    """Sink, recent and current-chunk tokens of the dynamic role, ``[Lk]``."""
    p, keep = plan.dynamic, torch.zeros(lk, dtype=torch.bool)
    for frames in (layout.sink(p), layout.recent(p), layout.current()):
        t = layout.tokens(frames)
        keep[t.start:t.stop] = True
    return keep


def _segments(layout: WindowLayout, plan: HeadPlan, chosen: list[int], lk: int) -> torch.Tensor:
    p, keep = plan.dynamic, torch.zeros(lk, dtype=torch.bool)
    cands = list(layout.candidates(p))
    bounds = segment_bounds(layout.frame_tokens, p.segments_per_frame)
    for idx in chosen:
        start, end = bounds[idx % p.segments_per_frame]
        base = cands[idx // p.segments_per_frame] * layout.frame_tokens
        keep[base + start:base + end] = True
    return keep


def policy_mask(policy: str, k: torch.Tensor, plan: HeadPlan, lq: int, seed: int = 0) -> torch.Tensor:
    """Bool ``[B, H, Lk]``: the tokens ``policy`` keeps for every head of ``k`` ``[B, H, Lk, D]``.

    ``plan`` gives the geometry and the dynamic role's parameters (its roles are ignored: every head
    follows the policy); the call must fit the plan's geometry.
    """
    b, h, lk, _ = k.shape
    layout = window_layout(lq, lk, plan.frame_tokens, plan.chunk_frames)
    if layout is None:
        raise ValueError(f"a window of {lk} keys for {lq} queries does not fit the plan's geometry")
    if policy == "forcing-kv":
        every = HeadPlan.from_roles([["dynamic"] * h], frame_tokens=plan.frame_tokens, chunk_frames=plan.chunk_frames,
                                    **_params(plan), selection=plan.selection)
        return keep_mask(k, every, 0, lq)
    p = plan.dynamic
    available = len(layout.candidates(p)) * p.segments_per_frame
    count = min(p.selected_segments, available)
    fixed = _fixed(layout, plan, lk)
    if policy == "random":
        gen = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(available, generator=gen)[:count].tolist()
        return (fixed | _segments(layout, plan, chosen, lk)).expand(b, h, lk).clone()
    if policy == "even":
        chosen = torch.linspace(0, available - 1, count).round().long().tolist() if count else []
        return (fixed | _segments(layout, plan, sorted(set(chosen)), lk)).expand(b, h, lk).clone()
    if policy == "streaming":
        budget = int((fixed | _segments(layout, plan, list(range(count)), lk)).sum())
        keep = torch.zeros(lk, dtype=torch.bool)
        sink = layout.tokens(layout.sink(p))
        keep[sink.start:sink.stop] = True
        keep[max(sink.stop, lk - (budget - len(sink))):] = True
        return keep.expand(b, h, lk).clone()
    if policy == "dummy-forcing":
        f, current = layout.frame_tokens, layout.tokens(layout.current())
        groups = [range(0, f) if layout.history else range(0), range(0),
                  range(current.start - f, current.start) if layout.history else range(0)]
        keep = torch.zeros(h, lk, dtype=torch.bool)
        keep[:, current.start:] = True
        for head in range(h):
            extra = groups[head % 3]
            keep[head, extra.start:extra.stop] = True
        return keep.expand(b, h, lk).clone()
    raise ValueError(f"policy expected one of {POLICIES}, got {policy!r}")


def _params(plan: HeadPlan) -> dict:
    p = plan.dynamic
    return {"sink_frames": p.sink_frames, "recent_frames": p.recent_frames, "candidate_frames": p.candidate_frames,
            "segments_per_frame": p.segments_per_frame, "retention": p.retention}


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The oracle of a policy: dense attention with its keep mask ``[B, H, Lk]``."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, :, None, :])


def gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A policy run as compressed attention: per (batch item, head) SDPA over its kept tokens only."""
    out = torch.empty_like(q)
    for bi in range(q.shape[0]):
        for h in range(q.shape[1]):
            keep = mask[bi, h].nonzero().flatten()
            out[bi, h] = F.scaled_dot_product_attention(q[bi, h], k[bi, h, keep], v[bi, h, keep])
    return out
