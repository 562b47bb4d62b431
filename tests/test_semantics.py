"""The keep rule's invariants, checked against a brute-force reading of the rule in fkv_compile.semantics."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from strategies import attention_inputs, plans

from fkv_compile import HeadPlan
from fkv_compile.semantics import keep_mask, oracle_attention, segment_bounds, window_layout


def _frames_of(mask_row, frame_tokens):
    return mask_row.view(-1, frame_tokens)


@given(st.data())
def test_keep_rule_invariants(data):
    plan = data.draw(plans())
    q, k, v = data.draw(attention_inputs(plan))
    mask = keep_mask(k, plan, 0, q.shape[2])
    f, c = plan.frame_tokens, plan.chunk_frames
    n = k.shape[2] // f
    h = n - c
    for head, role in enumerate(plan.roles[0]):
        frames = mask[:, head].view(mask.shape[0], n, f)
        # the current chunk is always kept
        assert frames[:, h:].all()
        if role == "dense":
            assert mask[:, head].all()
            continue
        p = plan.params(role)
        # keeps_all (select's dense shortcut) holds only where the rule keeps everything; static heads keep
        # everything exactly then
        whole = window_layout(q.shape[2], k.shape[2], f, c).keeps_all(p)
        assert not whole or frames.all()
        assert role != "static" or whole == bool(frames.all())
        sink = set(range(min(p.sink_frames, h)))
        recent = set(range(max(p.sink_frames, h - p.recent_frames), h))
        candidates = list(range(max(p.sink_frames, h - p.recent_frames - p.candidate_frames), h - p.recent_frames))
        for fr in sink | recent:
            assert frames[:, fr].all()
        # nothing outside sink, recent, candidates and the chunk
        for fr in range(h):
            if fr not in sink | recent and (role == "static" or fr not in candidates):
                assert not frames[:, fr].any(), (fr, role)
        if role == "dynamic":
            budget = min(math.floor(p.candidate_frames * p.segments_per_frame * p.retention + 0.5),
                         len(candidates) * p.segments_per_frame)
            bounds = segment_bounds(f, p.segments_per_frame)
            for b in range(mask.shape[0]):
                kept_segments = [(fr, j) for fr in candidates for j, (s, e) in enumerate(bounds) if frames[b, fr, s:e].all()]
                partial = [(fr, j) for fr in candidates for j, (s, e) in enumerate(bounds)
                           if frames[b, fr, s:e].any() and not frames[b, fr, s:e].all()]
                assert not partial  # whole segments only
                assert len(kept_segments) == budget


def _brute_similarity(keys, f, frame, start, end):
    """Mean over tokens of cosine(key of token, key of same token in the next frame), float64."""
    sims = [F.cosine_similarity(keys[frame * f + t], keys[(frame + 1) * f + t], dim=0, eps=1e-30)
            for t in range(start, end)]
    return torch.stack(sims).mean()


@given(st.data())
def test_dynamic_keeps_the_lowest_similarity_segments(data):
    plan = data.draw(plans(compressing=True))  # every example chooses: a dynamic head, 0 < k < candidate segments
    q, k, v = data.draw(attention_inputs(plan, batch=1, long=True))
    mask = keep_mask(k, plan, 0, q.shape[2])
    heads = plan.heads(0, "dynamic")
    layout = window_layout(q.shape[2], k.shape[2], plan.frame_tokens, plan.chunk_frames)
    p = plan.dynamic
    f = plan.frame_tokens
    groups = [[h] for h in heads] if plan.selection == "head" else [list(heads)]
    for group in groups:
        keys = k[0, group].transpose(0, 1).flatten(1)  # [Lk, heads * D]
        scored = []
        for fr in layout.candidates(p):
            for j, (s, e) in enumerate(segment_bounds(f, p.segments_per_frame)):
                scored.append((float(_brute_similarity(keys, f, fr, s, e)), fr, s, e))
        kept = [bool(mask[0, group[0], fr * f + s]) for _, fr, s, e in scored]
        dropped_sims = [sim for (sim, *_), kk in zip(scored, kept) if not kk]
        kept_sims = [sim for (sim, *_), kk in zip(scored, kept) if kk]
        assert kept_sims and dropped_sims, "a compressing example must keep some candidates and drop others"
        assert len(kept_sims) == p.selected_segments
        assert max(kept_sims) <= min(dropped_sims) + 1e-12
        for h in group:  # one selection is shared by every head of the group
            assert torch.equal(mask[0, h], mask[0, group[0]])


@given(st.data())
def test_baselines_keep_their_segments_whatever_the_keys(data):
    plan = dataclasses.replace(data.draw(plans()), segment_choice=data.draw(st.sampled_from(["random", "even", "recent"])))
    q, k, v = data.draw(attention_inputs(plan))
    mask = keep_mask(k, plan, 0, q.shape[2])
    assert torch.equal(mask, keep_mask(torch.randn_like(k), plan, 0, q.shape[2])), "a baseline ignores the keys"
    heads = plan.heads(0, "dynamic")
    layout = window_layout(q.shape[2], k.shape[2], plan.frame_tokens, plan.chunk_frames)
    if not heads:
        return
    p, f = plan.dynamic, plan.frame_tokens
    segments = [(fr, s, e) for fr in layout.candidates(p) for s, e in segment_bounds(f, p.segments_per_frame)]
    kept = [i for i, (fr, s, e) in enumerate(segments) if mask[0, heads[0], fr * f + s : fr * f + e].all()]
    count = min(p.selected_segments, len(segments))
    assert len(kept) == count
    if plan.segment_choice == "recent":  # the latest segments: with the recent frames, one sliding window
        assert kept == list(range(len(segments) - count, len(segments)))
    if plan.segment_choice == "even" and count > 1:
        assert kept[0] == 0 and kept[-1] == len(segments) - 1
        gaps = [b - a for a, b in zip(kept, kept[1:])]
        assert max(gaps) - min(gaps) <= 1
    assert bool((mask[:, list(heads)] == mask[:1, heads[0]]).all()), "every head and batch item keeps the same"


def test_ties_go_to_the_lower_index():
    plan = HeadPlan.from_roles([["dynamic"]], frame_tokens=4, chunk_frames=1, sink_frames=0, dynamic_recent_frames=0,
                               candidate_frames=2, segments_per_frame=2, retention=0.5)
    k = torch.ones(1, 1, 12, 2, dtype=torch.float64)  # every similarity is exactly 1
    mask = keep_mask(k, plan, 0, 4)
    # candidates are frames 0 and 1 (4 segments), k = 2: the two lowest indices, frame 0
    assert mask[0, 0, :4].all() and not mask[0, 0, 4:8].any()


def test_shapes_that_do_not_fit_stay_dense():
    plan = HeadPlan.from_roles([["static", "dynamic"]], frame_tokens=5, chunk_frames=2, segments_per_frame=5)
    k = torch.randn(1, 2, 5 * 7 + 1, 4)
    assert keep_mask(k, plan, 0, 10).all()  # Lk not whole frames
    assert keep_mask(k[:, :, :35], plan, 0, 9).all()  # Lq not a chunk


def test_all_dense_plan_equals_uncompressed_attention():
    plan = HeadPlan.uniform("dense", num_layers=1, num_heads=3, frame_tokens=6, chunk_frames=2)
    q, k, v = torch.randn(2, 3, 12, 8), torch.randn(2, 3, 60, 8), torch.randn(2, 3, 60, 8)
    assert torch.equal(oracle_attention(q, k, v, plan, 0), F.scaled_dot_product_attention(q, k, v))


def test_short_windows_keep_what_exists():
    plan = HeadPlan.from_roles([["static", "dynamic"]], frame_tokens=3, chunk_frames=2, sink_frames=1, recent_frames=1,
                               segments_per_frame=3)
    for frames in (2, 3, 4):  # no history, only sink, sink + recent
        k = torch.randn(1, 2, frames * 3, 4)
        assert keep_mask(k, plan, 0, 6).all()


@pytest.mark.parametrize("candidates,segments,retention,k", [
    (1, 1, 0.5, 1),  # N_c P r = 0.5 rounds half up (Python's round() gives 0)
    (5, 1, 0.5, 3),  # 2.5 -> 3 (round() gives 2)
    (3, 1, 0.5, 2),  # 1.5 -> 2 (a floor gives 1)
    (3, 6, 0.33, 6),  # Forcing-KV's defaults: 5.94 -> 6
    (2, 3, 0.25, 2),  # 1.5 -> 2
])
def test_k_rounds_half_up_at_the_boundary(candidates, segments, retention, k):
    plan = HeadPlan.from_roles([["dynamic"]], frame_tokens=segments * 2, chunk_frames=1, sink_frames=1,
                               recent_frames=1, candidate_frames=candidates, segments_per_frame=segments,
                               retention=retention)
    assert plan.dynamic.selected_segments == k
    frames = 1 + candidates + 1 + 1  # sink, the candidates, recent, the chunk: every candidate present
    f = plan.frame_tokens
    keys = torch.randn(1, 1, frames * f, 4, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    mask = keep_mask(keys, plan, 0, f)
    assert int(mask[0, 0, f : (1 + candidates) * f].sum()) == k * f // segments  # k segments of F / P tokens


def test_ties_go_to_the_earlier_segment():
    # identical keys in every frame: every candidate segment has similarity 1, so the first k are kept
    plan = HeadPlan.from_roles([["dynamic"]], frame_tokens=4, chunk_frames=1, sink_frames=1, recent_frames=1,
                               candidate_frames=3, segments_per_frame=2, retention=0.5)
    frame = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    keys = frame.repeat(1, 1, 6, 1)  # sink, 3 candidates, recent, chunk
    mask = keep_mask(keys, plan, 0, 4)
    k = plan.dynamic.selected_segments  # 3 of the 6 candidate segments
    assert mask[0, 0, 4:16].tolist() == [True] * (2 * k) + [False] * (12 - 2 * k)
