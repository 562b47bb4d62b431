"""The compact store against the keep rule on the dense window, over random chunk sequences."""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from fkv_compile import HeadPlan
from fkv_compile.modes.dispatch import kernels_for
from fkv_compile.modes.store import LayerStore
from fkv_compile.plan import SEGMENT_CHOICES
from fkv_compile.semantics import keep_mask, oracle_attention
from fkv_compile.tools.testing import assert_within_budget, error_budget, selection_margin


class DenseCache:
    """The Self Forcing cache bookkeeping in frames: append, or roll keeping ``sink`` frames (windowed)."""

    def __init__(self, b, h, d, f, frames, sink, dtype=torch.float64):
        self.k = torch.zeros(b, frames * f, h, d, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.f, self.frames, self.sink = f, frames, sink
        self.end = 0  # tokens in the cache

    def write(self, k, v, new_chunk, store):
        f, s = self.f, k.shape[1]
        if new_chunk and self.end + s > self.k.shape[1]:
            evicted = self.end + s - self.k.shape[1]
            rolled = self.end - evicted - self.sink * f
            src, dst = self.sink * f + evicted, self.sink * f
            self.k[:, dst:dst + rolled] = self.k[:, src:src + rolled].clone()
            self.v[:, dst:dst + rolled] = self.v[:, src:src + rolled].clone()
            store.roll(dst, src, rolled)
            self.end -= evicted
        start = self.end if new_chunk else self.end - s
        self.k[:, start:start + s], self.v[:, start:start + s] = k, v
        self.end = start + s
        window = (max(0, self.end - self.k.shape[1]), self.end)
        store.write(k, v, start, self.end, window)
        return window


@st.composite
def scenarios(draw):
    f = draw(st.integers(2, 6))
    c = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 4))
    roles = [draw(st.sampled_from(["dense", "static", "dynamic"])) for _ in range(heads)]
    if heads >= 3:  # every role in one layer: a dense group keeps what a new video must drop
        roles[:3] = draw(st.permutations(["dense", "static", "dynamic"]))
    roles = [roles]
    plan = HeadPlan.from_roles(
        roles, frame_tokens=f, chunk_frames=c, sink_frames=draw(st.integers(0, 2)),
        static_recent_frames=draw(st.integers(0, 2)), dynamic_recent_frames=draw(st.integers(1, 2)),
        candidate_frames=draw(st.integers(0, c)), segments_per_frame=draw(st.integers(1, f)),
        retention=draw(st.floats(0, 1)), segment_choice=draw(st.sampled_from(SEGMENT_CHOICES)),
    )
    windowed = draw(st.booleans())
    model_sink = draw(st.integers(plan.static.sink_frames, plan.static.sink_frames + 2))
    # the store serves a rolling window exactly when the model's sink covers the plan's and the
    # window is longer than sink + recent + candidates + chunk (LongLive: 3 + 1 + 3 + 3 <= 12)
    reach = max(plan.static.recent_frames, plan.dynamic.recent_frames + plan.dynamic.candidate_frames)
    frames = draw(st.integers(c + model_sink + reach, c + model_sink + reach + 4)) if windowed else 40
    # chunks, each written 1 to 3 times at the same position (denoising steps, clean pass), and whether a new
    # video starts with it (the pipeline's fresh caches: writes from position 0 again)
    writes = draw(st.lists(st.tuples(st.integers(1, 3), st.booleans()), min_size=1, max_size=10))
    return plan, windowed, model_sink if windowed else 0, frames, writes, draw(st.integers(0, 2**31 - 1)), draw(st.integers(1, 2))


# the torch path in float64 and bf16; the Triton kernels (interpreter, float32 at most) in float32. ``tol``: the
# selection margin below which a near tie may go either way (similarities are computed in at least float32)
PATHS = [pytest.param(False, torch.float64, 1e-9, id="torch"), pytest.param(True, torch.float32, 1e-5, id="triton"),
         pytest.param(False, torch.bfloat16, 1e-5, id="torch-bf16")]


@pytest.mark.parametrize("triton,dtype,tol", PATHS)
@given(scenario=scenarios())
def test_store_keeps_what_the_rule_keeps_on_the_dense_window(triton, dtype, tol, scenario):
    plan, windowed, model_sink, frames, writes, seed, b = scenario
    gen = torch.Generator().manual_seed(seed)
    h, d, f = plan.num_heads, 4, plan.frame_tokens
    cache = DenseCache(b, h, d, f, frames, model_sink, dtype)
    store = LayerStore(plan, 0, kernels_for("triton" if triton else "torch", "cpu"))
    for repeats, new_video in writes:
        if new_video:
            cache = DenseCache(b, h, d, f, frames, model_sink, dtype)
        for step in range(repeats):
            k = torch.randn(b, plan.chunk_tokens, h, d, generator=gen, dtype=dtype)
            v = torch.randn_like(k)
            a, e = cache.write(k, v, step == 0, store)
            wk, wv = cache.k[:, a:e].transpose(1, 2), cache.v[:, a:e].transpose(1, 2)
            assume(selection_margin(wk, plan, 0, plan.chunk_tokens) > tol)
            expected = keep_mask(wk.double(), plan, 0, plan.chunk_tokens)
            assert torch.equal(store.kept_mask(h), expected)
            q = torch.randn(b, h, plan.chunk_tokens, d, generator=gen, dtype=dtype)
            expected_out = oracle_attention(q.double(), wk.double(), wv.double(), plan, 0)
            got = store.attention(q, (a, e), None)
            if dtype == torch.bfloat16:  # the budget of an independent bf16 implementation: masked SDPA in bf16
                budget = error_budget(oracle_attention(q, wk, wv, plan, 0), expected_out, floor=4 * 2**-8)
                assert_within_budget(got, expected_out, budget, "bf16 store attention")
            else:
                torch.testing.assert_close(got.double(), expected_out, rtol=tol, atol=tol)


def test_memory_is_bounded_by_the_plan_not_the_video():
    plan = HeadPlan.from_roles([["static", "dynamic"]], frame_tokens=6, chunk_frames=3)
    cache = DenseCache(1, 2, 4, 6, 12, 1)
    store = LayerStore(plan, 0)
    sizes = []
    for chunk in range(40):
        k = torch.randn(1, 18, 2, 4, dtype=torch.float64)
        cache.write(k, k.clone(), True, store)
        sizes.append(store.nbytes())
    assert len(set(sizes[4:])) == 1  # constant once the window holds sink + recent + candidates
    # static: 1 sink + 1 recent + 3 chunk frames; dynamic: + round(3 * 6 * 0.33) = 6 segments of 1 token
    per_token = 2 * 4 * 8 + 8  # K and V of one head in float64, plus the int64 position
    assert sizes[-1] == (5 * 6) * per_token + (5 * 6 + 6) * per_token


def test_plans_the_store_cannot_serve_exactly_are_refused():
    from fkv_compile.modes.store import StoreError, compact_unsupported

    base = dict(frame_tokens=4, chunk_frames=2, segments_per_frame=2)
    assert compact_unsupported(HeadPlan.from_roles([["static", "dynamic"]], **base, candidate_frames=2)) is None
    for params, match in (({"dynamic_recent_frames": 0}, "recent_frames >= 1"),
                          ({"candidate_frames": 3}, "candidate_frames <= chunk_frames"),
                          ({"candidate_frames": 2, "selection": "head"}, "selection='head'")):
        plan = HeadPlan.from_roles([["dynamic"]], **base, **params)
        assert match in compact_unsupported(plan)
        with pytest.raises(StoreError, match=match):
            LayerStore(plan, 0)


def test_attention_follows_every_commit_at_a_full_rolling_window():
    # ragged segments (5 tokens in 2 segments of 3 and 2): which segments a commit keeps changes where the padding
    # of the held tokens lies, per batch item, from chunk to chunk at the same window
    plan = HeadPlan.from_roles([["dynamic", "static"]], frame_tokens=5, chunk_frames=1, candidate_frames=1,
                               segments_per_frame=2, retention=0.5)
    gen = torch.Generator().manual_seed(0)
    cache, store = DenseCache(2, 2, 4, 5, 5, 1), LayerStore(plan, 0)
    kept_lengths = set()
    for _ in range(12):
        for step in range(2):
            k = torch.randn(2, 5, 2, 4, generator=gen, dtype=torch.float64)
            a, e = cache.write(k, torch.randn_like(k), step == 0, store)
            wk, wv = cache.k[:, a:e].transpose(1, 2), cache.v[:, a:e].transpose(1, 2)
            q = torch.randn(2, 2, 5, 4, generator=gen, dtype=torch.float64)
            expected = oracle_attention(q, wk, wv, plan, 0)
            torch.testing.assert_close(store.attention(q, (a, e), None), expected, rtol=1e-9, atol=1e-9)
            kept_lengths.add(tuple(keep_mask(wk, plan, 0, 5)[:, 0].sum(-1).tolist()))
    assert len(kept_lengths) > 2  # the selected segments' lengths did change between chunks and items
