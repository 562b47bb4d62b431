"""Hypothesis strategies shared by the tests: random geometry, plans and inputs."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from fkv_compile import HeadPlan
from fkv_compile.plan import SEGMENT_CHOICES

ROLE = st.sampled_from(["dense", "static", "dynamic"])


@st.composite
def plans(draw, *, num_layers: int = 1, max_heads: int = 4, compressing: bool = False):
    """Random plans, biased to compress: nine in ten have a static or dynamic head in every layer (all-dense plans
    stay possible). ``compressing``: ones where the dynamic role really chooses (a dynamic head, candidates,
    similarity selection, ``0 < k <`` the candidate segments), the case the choice-ordering checks need."""
    frame_tokens = draw(st.integers(2 if compressing else 1, 13))
    heads = draw(st.integers(1, max_heads))
    roles = [[draw(ROLE) for _ in range(heads)] for _ in range(num_layers)]
    if compressing:
        roles = [row[:-1] + ["dynamic"] for row in roles]
    elif draw(st.integers(0, 9)):
        for row in roles:
            if set(row) == {"dense"}:
                row[draw(st.integers(0, heads - 1))] = draw(st.sampled_from(["static", "dynamic"]))
    segments = draw(st.integers(2 if compressing else 1, frame_tokens))
    candidates = draw(st.integers(1 if compressing else 0, 4))
    if compressing:  # k = floor(N_c P r + 0.5) strictly between 0 and N_c P
        k = draw(st.integers(1, candidates * segments - 1))
        retention = k / (candidates * segments)
    else:
        retention = draw(st.floats(0.0, 1.0))
    return HeadPlan.from_roles(
        roles,
        frame_tokens=frame_tokens,
        chunk_frames=draw(st.integers(1, 3)),
        sink_frames=draw(st.integers(0, 3)),
        static_recent_frames=draw(st.integers(0, 3)),
        dynamic_recent_frames=draw(st.integers(0, 3)),
        candidate_frames=candidates,
        segments_per_frame=segments,
        retention=retention,
        selection=draw(st.sampled_from(["layer", "head"])),
        segment_choice="similarity" if compressing else draw(st.sampled_from(SEGMENT_CHOICES)),
    )


def full_window(plan: HeadPlan) -> int:
    """Frames of the shortest window in which every compressed role drops something (all its parts present)."""
    reach = max(p.sink_frames + p.recent_frames for p in (plan.static, plan.dynamic)) + plan.dynamic.candidate_frames
    return plan.chunk_frames + reach + 1


@st.composite
def attention_inputs(draw, plan: HeadPlan, *, batch: int | None = None, fits: bool = True, long: bool = False):
    """q [B, H, Lq, D], k, v [B, H, Lk, D] in float64, fresh random normal (never zeros); windows in which every
    role compresses (:func:`full_window`) in three examples of four, always when ``long``."""
    b = batch or draw(st.integers(1, 2))
    d = draw(st.sampled_from([4, 8]))
    long = long or draw(st.integers(0, 3)) > 0
    shortest = full_window(plan) if long else plan.chunk_frames
    frames = draw(st.integers(shortest, shortest + (4 if long else 9)))
    lq = plan.chunk_tokens
    lk = frames * plan.frame_tokens
    if not fits:
        lk += draw(st.integers(1, max(1, plan.frame_tokens - 1))) if plan.frame_tokens > 1 else 0
        lq += draw(st.sampled_from([0, 1])) if plan.frame_tokens > 1 else 1
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, plan.num_heads, lq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, plan.num_heads, lk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, plan.num_heads, lk, d, generator=gen, dtype=torch.float64)
    return q, k, v


def ranges_mask(starts: torch.Tensor, ends: torch.Tensor, lk: int) -> torch.Tensor:
    """``[B, G, Lk]``: the key tokens inside any of the ranges ``[B, G, R]``."""
    pos = torch.arange(lk)
    return ((pos >= starts[..., None]) & (pos < ends[..., None])).any(-2)


@st.composite
def ragged_ranges(draw, b, heads, lk):
    """Disjoint ranges per (batch item, head): one range, many small ones, or random cuts; never all empty."""
    starts = torch.zeros(b, heads, 8, dtype=torch.int32)
    ends = torch.zeros_like(starts)
    for bi in range(b):
        for h in range(heads):
            kind = draw(st.sampled_from(["one", "many-small", "random"]))
            if kind == "one":
                s = draw(st.integers(0, lk - 1))
                spans = [(s, draw(st.integers(s + 1, lk)))]
            else:
                cuts = sorted(draw(st.lists(st.integers(0, lk), min_size=2, max_size=16, unique=True)))
                spans = [(a, e if kind == "random" else min(e, a + 3)) for a, e in zip(cuts[::2], cuts[1::2])]
                spans = [(a, e) for a, e in spans if e > a] or [(0, 1)]
            for r, (a, e) in enumerate(spans[:8]):
                starts[bi, h, r], ends[bi, h, r] = a, e
    return starts, ends
