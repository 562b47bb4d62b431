"""The select path (gather + SDPA per role group) against the float64 masked-dense oracle."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import attention_inputs, plans, ragged_ranges, ranges_mask

from fkv_compile import HeadPlan
from fkv_compile.modes import torch_ops
from fkv_compile.modes.select import SelectionMemo, compressed_attention
from fkv_compile.semantics import keep_mask, oracle_attention
from fkv_compile.tools.testing import assert_within_budget, error_budget, selection_margin

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _low_precision_reference(q, k, v, plan, dtype):
    """An independent low-precision oracle: masked SDPA in ``dtype``, mask from the same keys."""
    mask = keep_mask(k.to(dtype), plan, 0, q.shape[2])
    return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask[:, :, None, :])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(data=st.data())
def test_select_matches_float64_oracle(dtype, data):
    plan = data.draw(plans())
    q, k, v = data.draw(attention_inputs(plan))
    ql, kl, vl = q.to(dtype), k.to(dtype), v.to(dtype)
    # the kept set is decided on the keys as stored (in dtype); the oracle sees the same values
    assume(selection_margin(kl, plan, 0, q.shape[2]) > 1e-5)
    ref = oracle_attention(ql.double(), kl.double(), vl.double(), plan, 0)
    out, kept = compressed_attention(ql, kl, vl, plan, 0)
    assert out.dtype == dtype and out.shape == q.shape
    budget = error_budget(_low_precision_reference(ql.double(), kl.double(), vl.double(), plan, dtype), ref,
                          floor=8 * torch.finfo(dtype).eps)
    assert_within_budget(out, ref, budget, f"select {dtype}")
    mask = keep_mask(kl.double(), plan, 0, q.shape[2])
    assert kept.kept.tolist() == pytest.approx(mask.sum(-1).double().mean(0).tolist())


@given(data=st.data())
def test_calls_that_do_not_fit_run_dense(data):
    plan = data.draw(plans())
    q, k, v = data.draw(attention_inputs(plan, fits=False))
    assume(q.shape[2] != plan.chunk_tokens or k.shape[2] % plan.frame_tokens)
    out, kept = compressed_attention(q, k, v, plan, 0)
    assert not kept.layout_fits
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=1e-12)


def test_all_dense_plan_is_uncompressed_attention_bit_for_bit():
    plan = HeadPlan.uniform("dense", num_layers=1, num_heads=4, frame_tokens=7, chunk_frames=3)
    q, k, v = torch.randn(2, 4, 21, 16), torch.randn(2, 4, 70, 16), torch.randn(2, 4, 70, 16)
    out, _ = compressed_attention(q, k, v, plan, 0)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("selection", ["layer", "head"])
def test_uneven_segments_with_strided_inputs(selection):
    # F % P != 0 gives segments of different lengths (a padding mask inside the group); inputs are
    # transposed views as the models pass them
    plan = HeadPlan.from_roles([["dynamic", "static", "dynamic", "dense"]], frame_tokens=7, chunk_frames=2,
                               segments_per_frame=3, retention=0.5, selection=selection)
    q = torch.randn(2, 14, 4, 8).transpose(1, 2)
    k = torch.randn(2, 63, 4, 8).transpose(1, 2)
    v = torch.randn(2, 63, 4, 8).transpose(1, 2)
    out, kept = compressed_attention(q, k, v, plan, 0)
    ref = oracle_attention(q.double(), k.double(), v.double(), plan, 0)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    assert kept.kept[3].item() == 63.0 and kept.kept[1].item() == (1 + 1 + 2) * 7


def _laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values ``[B, H, L, D]`` in the memory layouts a caller can hand the op."""
    if layout == "model":  # [B, L, H, D] seen as [B, H, L, D]
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "window":  # a slice of a longer cache in the model's layout: a storage offset
        cache = torch.randn(x.shape[0], x.shape[2] + 5, x.shape[1], x.shape[3], dtype=x.dtype)
        cache[:, 3 : 3 + x.shape[2]] = x.transpose(1, 2)
        return cache[:, 3 : 3 + x.shape[2]].transpose(1, 2)
    if layout == "padded":  # rows of D + 3 elements whose last 3 belong to something else (a fused projection)
        wide = torch.randn(x.shape[0], x.shape[2], x.shape[1], x.shape[3] + 3, dtype=x.dtype)
        wide[..., : x.shape[3]] = x.transpose(1, 2)
        return wide[..., : x.shape[3]].transpose(1, 2)
    if layout == "head-dim strided":  # no unit stride in the last dim
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x.contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(data=st.data())
def test_torch_range_attention_matches_the_float64_oracle_in_any_layout(dtype, data):
    b, h = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 4))
    lq, lk, d = data.draw(st.integers(1, 20)), data.draw(st.integers(1, 60)), data.draw(st.sampled_from([4, 16]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(dtype) for n in (lq, lk, lk))
    q, k, v = (_laid_out(x, data.draw(st.sampled_from(["contiguous", "model", "window", "padded", "head-dim strided"])))
               for x in (q, k, v))
    starts, ends = data.draw(ragged_ranges(b, h, lk))
    if data.draw(st.booleans(), label="every head the same ranges (sliced, not gathered)"):
        starts, ends = starts[:, :1].expand_as(starts), ends[:, :1].expand_as(ends)
    mask = ranges_mask(starts, ends, lk)[:, :, None, :]
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    low = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = torch_ops.range_attention(q, k, v, starts, ends)
    assert out.dtype == dtype and out.shape == q.shape
    budget = error_budget(low, ref, floor=4 * torch.finfo(dtype).eps)
    assert_within_budget(out, ref, budget, f"torch ranges {dtype}")
    # a store's head group: k/v head g serves q head order[g] of a wider q, in place; the other q head is left alone
    *order, other = data.draw(st.permutations(range(h + 1)))
    wide_q = torch.randn(b, h + 1, lq, d, generator=gen).to(dtype)
    wide_q[:, order] = q
    served = torch.full_like(wide_q, 7.0)
    torch_ops.range_attention(wide_q, k, v, starts, ends, q_heads=torch.tensor(order), out=served)
    assert_within_budget(served[:, order], ref, budget, f"torch ranges into q heads {order} {dtype}")
    assert bool((served[:, other] == 7.0).all())


def test_a_layer_reuses_its_ranges_only_for_the_same_history():
    plan = HeadPlan.from_roles([["dynamic", "static", "dynamic"]], frame_tokens=6, chunk_frames=2, segments_per_frame=3,
                               candidate_frames=3, dynamic_recent_frames=1, retention=0.34)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, n * 6, 8, generator=gen, dtype=torch.float64) for n in (2, 8, 8))
    other = torch.randn(k.shape, generator=gen, dtype=torch.float64)  # another history, the same shape
    assert not torch.equal(keep_mask(k, plan, 0, 12), keep_mask(other, plan, 0, 12))  # so a stale choice shows
    steps = k.clone()
    steps[:, :, -12:] = torch.randn(1, 3, 12, 8, generator=gen, dtype=torch.float64)  # a later step: a new chunk only
    memo = SelectionMemo()
    # a chunk's steps reuse; a call that cannot tell its history (a roll) chooses and makes the next one choose
    # although it names the history of before, and so does a call that runs dense; a new position chooses
    for keys, history, reused in ((k, (36, 0), 0), (steps, (36, 0), 1), (other, None, 1), (other, (36, 0), 1),
                                  (other, (36, 0), 2), (k[:, :, :47], (36, 0), 2), (k, (36, 0), 2),
                                  (other, (42, 0), 2)):
        values = v[:, :, : keys.shape[2]]
        out, _ = compressed_attention(q, keys, values, plan, 0, memo=memo, history=history)
        torch.testing.assert_close(out, oracle_attention(q, keys, values, plan, 0), rtol=0, atol=1e-12)
        assert memo.reused == reused, (history, memo.reused)
