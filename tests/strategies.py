"""Hypothesis strategies shared by the tests: random geometry, plans and inputs."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from fkv_compile import HeadPlan
from fkv_compile.plan import SEGMENT_CHOICES

ROLE = st.sampled_from(["dense", "static", "dynamic"])


@st.composite
def plans(draw, *, num_layers: int = 1, max_heads: int = 4):
    frame_tokens = draw(st.integers(1, 13))
    heads = draw(st.integers(1, max_heads))
    roles = [[draw(ROLE) for _ in range(heads)] for _ in range(num_layers)]
    return HeadPlan.from_roles(
        roles,
        frame_tokens=frame_tokens,
        chunk_frames=draw(st.integers(1, 3)),
        sink_frames=draw(st.integers(0, 3)),
        static_recent_frames=draw(st.integers(0, 3)),
        dynamic_recent_frames=draw(st.integers(0, 3)),
        candidate_frames=draw(st.integers(0, 4)),
        segments_per_frame=draw(st.integers(1, frame_tokens)),
        retention=draw(st.floats(0.0, 1.0)),
        selection=draw(st.sampled_from(["layer", "head"])),
        segment_choice=draw(st.sampled_from(SEGMENT_CHOICES)),
    )


@st.composite
def attention_inputs(draw, plan: HeadPlan, *, batch: int | None = None, fits: bool = True):
    """q [B, H, Lq, D], k, v [B, H, Lk, D] in float64, fresh random normal (never zeros)."""
    b = batch or draw(st.integers(1, 2))
    d = draw(st.sampled_from([4, 8]))
    frames = draw(st.integers(plan.chunk_frames, plan.chunk_frames + 9))
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
