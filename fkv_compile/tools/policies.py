"""Baseline KV policies next to Forcing-KV's, as keep masks over one attention call's window.

The equal-budget baselines are plans: the dynamic role with another ``segment_choice``
(:class:`fkv_compile.HeadPlan`), so they run through the pass in every mode and share the keep
rule's oracle (:mod:`fkv_compile.semantics`). Each keeps exactly as many segments per head as the
keep rule's ``dynamic`` role (sink + recent + ``k`` segments + the current chunk):

- ``forcing-kv``: the ``k`` candidate segments least similar to the next frame;
- ``random``: ``k`` candidate segments drawn at random (seeded, the same for every call);
- ``even``: ``k`` candidate segments evenly spaced over the candidates;
- ``streaming``: the ``k`` most recent candidate segments: sink + a sliding window of the most
  recent tokens (StreamingLLM, LongLive), for every head.

``dummy-forcing`` (Dummy Forcing's three head groups: first frame, last chunk, latest frame only;
heads assigned round-robin) keeps fewer tokens and is reported with its own budget; it is a mask only.

Shape legend: ``B`` batch, ``H`` heads, ``Lk`` window tokens.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..plan import DYNAMIC, HeadPlan
from ..semantics import keep_mask, window_layout

__all__ = ["POLICIES", "EQUAL_BUDGET", "policy_plan", "policy_mask", "masked_attention", "gathered_attention"]

SEGMENT_CHOICE = {"forcing-kv": "similarity", "random": "random", "even": "even", "streaming": "recent"}
EQUAL_BUDGET: tuple[str, ...] = tuple(SEGMENT_CHOICE)
POLICIES: tuple[str, ...] = EQUAL_BUDGET + ("dummy-forcing",)


def policy_plan(policy: str, plan: HeadPlan) -> HeadPlan:
    """``plan`` with every head of every layer following an equal-budget ``policy``: compile a model with
    it to compare a baseline with Forcing-KV through the pass (select, compact, oracle modes alike)."""
    if policy not in SEGMENT_CHOICE:
        raise ValueError(f"policy expected one of {EQUAL_BUDGET} (dummy-forcing is a mask only), got {policy!r}")
    roles = [[DYNAMIC] * plan.num_heads for _ in range(plan.num_layers)]
    return dataclasses.replace(plan, roles=roles, segment_choice=SEGMENT_CHOICE[policy])


def policy_mask(policy: str, k: torch.Tensor, plan: HeadPlan, lq: int) -> torch.Tensor:
    """Bool ``[B, H, Lk]``: the tokens ``policy`` keeps for every head of ``k`` ``[B, H, Lk, D]``.

    ``plan`` gives the geometry and the dynamic role's parameters (its roles are ignored: every head
    follows the policy); the call must fit the plan's geometry.
    """
    b, h, lk, _ = k.shape
    layout = window_layout(lq, lk, plan.frame_tokens, plan.chunk_frames)
    if layout is None:
        raise ValueError(f"a window of {lk} keys for {lq} queries does not fit the plan's geometry")
    if policy in EQUAL_BUDGET:
        every = dataclasses.replace(plan, roles=[[DYNAMIC] * h], segment_choice=SEGMENT_CHOICE[policy])
        return keep_mask(k, every, 0, lq)
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
