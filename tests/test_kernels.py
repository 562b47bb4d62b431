"""The Triton kernels on CPU through the interpreter (conftest sets TRITON_INTERPRET=1), tiny shapes.

Every kernel against the float64 oracle on random ragged inputs; the custom ops and the compact
store through the Triton path against the torch path; the persisted autotune cache.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from strategies import attention_inputs, plans, ragged_ranges, ranges_mask  # noqa: E402

from fkv_compile import HeadPlan, kernels  # noqa: E402
from fkv_compile.config import Config, OptionsError  # noqa: E402
from fkv_compile.modes.dispatch import TORCH, KernelsError, kernels_for  # noqa: E402
from fkv_compile.semantics import WindowLayout, keep_mask, oracle_attention, selection_keys  # noqa: E402
from fkv_compile.tools.testing import assert_within_budget, error_budget, selection_margin  # noqa: E402

if not kernels.interpreting():
    pytest.skip("the kernel tests run the Triton interpreter: TRITON_INTERPRET=1 before Triton's import",
                allow_module_level=True)

TRITON = kernels_for("triton", "cpu")

from fkv_compile.kernels.attention import range_attention  # noqa: E402
from fkv_compile.kernels.gather import gather_tokens  # noqa: E402
from fkv_compile.kernels.similarity import segment_similarity  # noqa: E402
from fkv_compile.kernels.tuning import TunedKernel, TuningCache  # noqa: E402
from fkv_compile.modes.ranges import mask_runs, select_ranges  # noqa: E402
from fkv_compile.modes.select import compressed_attention  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the interpreter costs about a second per example here: at most 20 per property unless asked for more
INTERPRETED = settings(settings.default, max_examples=min(settings.default.max_examples, 20)) \
    if settings.default.max_examples <= 40 else settings.default


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@INTERPRETED
@given(data=st.data())
def test_range_attention_matches_the_float64_oracle(dtype, data):
    b, h = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    lq, lk = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 90))
    d = data.draw(st.sampled_from([16, 24, 64, 128]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    q, k, v = (torch.randn(b, n, h, d, generator=gen).to(dtype) for n in (lq, lk, lk))
    if data.draw(st.booleans(), label="model layout [B, L, H, D] seen as [B, H, L, D]"):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    else:
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    starts, ends = data.draw(ragged_ranges(b, h, lk))
    mask = ranges_mask(starts, ends, lk)[:, :, None, :]
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    low = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out, lse = range_attention(q, k, v, starts, ends, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert_within_budget(out, ref, error_budget(low, ref, floor=4 * torch.finfo(dtype).eps), f"range_attention {dtype}")
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
    lse_ref = torch.logsumexp(scores.masked_fill(~mask, -math.inf), -1)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)


def test_heads_with_no_tokens_give_zeros_and_minus_infinite_lse():
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    starts, ends = torch.tensor([[[0], [0]]]), torch.tensor([[[4], [0]]])
    out, lse = range_attention(q, k, v, starts, ends, return_lse=True)
    assert torch.equal(out[:, 1], torch.zeros(1, 5, 16)) and bool((lse[:, 1] == -math.inf).all())
    torch.testing.assert_close(out[:, 0], F.scaled_dot_product_attention(q[:, :1], k[:, :1, :4], v[:, :1, :4])[:, 0])


def test_q_heads_serve_a_head_group_in_place_and_leave_other_heads_alone():
    q = torch.randn(2, 4, 6, 16)
    k, v = torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16)  # a group holding heads 3 and 1
    out = torch.full((2, 4, 6, 16), 7.0)
    starts, ends = torch.zeros(2, 2, 1, dtype=torch.int32), torch.full((2, 2, 1), 11, dtype=torch.int32)
    range_attention(q, k, v, starts, ends, q_heads=torch.tensor([3, 1]), out=out)
    torch.testing.assert_close(out[:, [3, 1]], F.scaled_dot_product_attention(q[:, [3, 1]], k, v))
    assert bool((out[:, [0, 2]] == 7.0).all())


def test_bad_shapes_are_clear_errors():
    q, k = torch.randn(1, 2, 4, 16), torch.randn(1, 3, 8, 16)
    ranges = torch.zeros(1, 3, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="pass q_heads"):
        range_attention(q, k, k, ranges, ranges)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        range_attention(q.double(), k.double()[:, :2], k.double()[:, :2], ranges[:, :2], ranges[:, :2])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@INTERPRETED
@given(data=st.data())
def test_segment_similarity_matches_the_keep_rule(dtype, data):
    plan = data.draw(plans())
    assume(plan.count("dynamic") and plan.dynamic.candidate_frames)
    frames = data.draw(st.integers(plan.chunk_frames + 2, plan.chunk_frames + 8))
    layout = WindowLayout(plan.frame_tokens, plan.chunk_frames, frames)
    cands = layout.candidates(plan.dynamic)
    assume(len(cands))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    d = data.draw(st.sampled_from([8, 64]))
    k = torch.randn(2, frames * plan.frame_tokens, plan.num_heads, d, generator=gen).to(dtype).transpose(1, 2)
    heads = plan.heads(0, "dynamic")
    groups = torch.tensor([list(heads)] if plan.selection == "layer" else [[h] for h in heads])
    from fkv_compile.semantics import candidate_similarity as reference

    expected = reference(selection_keys(k.double(), heads, plan.selection), layout, plan.dynamic)
    got = segment_similarity(k, groups, cands.start, len(cands), plan.frame_tokens, plan.dynamic.segments_per_frame)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_gather_copies_tokens_exactly_and_zeroes_padding(dtype):
    k = torch.randn(2, 13, 3, 24).to(dtype).transpose(1, 2)  # [B, G, L, D] strided
    v = torch.randn(2, 3, 13, 24).to(dtype)
    index = torch.tensor([[12, 0, -1, 5, 5, 3, 7], [1, 2, 3, -1, -1, 11, 12]])
    gk, gv = gather_tokens(k, v, index)
    bi = torch.arange(2)[:, None]
    for got, src in ((gk, k), (gv, v)):
        expect = torch.where((index >= 0)[:, None, :, None], src.transpose(1, 2)[bi, index.clamp_min(0)].transpose(1, 2), 0)
        assert torch.equal(got, expect)
    with pytest.raises(IndexError, match="out of range"):
        gather_tokens(k, v, torch.tensor([[13], [0]]))


@given(st.lists(st.lists(st.booleans(), min_size=0, max_size=30), min_size=1, max_size=3).filter(
    lambda rows: len({len(r) for r in rows}) == 1))
def test_mask_runs_cover_exactly_the_mask(rows):
    mask = torch.tensor(rows, dtype=torch.bool)
    starts, ends = mask_runs(mask)
    assert bool((starts <= ends).all())
    assert torch.equal(ranges_mask(starts, ends, mask.shape[1]), mask)


@INTERPRETED
@given(data=st.data())
def test_select_ranges_are_the_keep_mask(data):
    plan = data.draw(plans())
    q, k, _ = data.draw(attention_inputs(plan))
    k = k.float()
    assume(selection_margin(k, plan, 0, q.shape[2]) > 1e-5)
    from fkv_compile.semantics import window_layout

    layout = window_layout(q.shape[2], k.shape[2], plan.frame_tokens, plan.chunk_frames)
    starts, ends = select_ranges(k, plan, 0, layout, TRITON)
    assert torch.equal(ranges_mask(starts, ends, k.shape[2]), keep_mask(k, plan, 0, q.shape[2]))
    assert bool(((ends - starts).sum(-1) == keep_mask(k, plan, 0, q.shape[2]).sum(-1)).all()), "ranges overlap"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@INTERPRETED
@given(data=st.data())
def test_select_through_triton_equals_the_torch_path_and_the_oracle(dtype, data):
    plan = data.draw(plans())
    q, k, v = (x.to(dtype) for x in data.draw(attention_inputs(plan)))
    assume(selection_margin(k, plan, 0, q.shape[2]) > 1e-5)
    ref = oracle_attention(q.double(), k.double(), v.double(), plan, 0)
    torch_out, torch_kept = compressed_attention(q, k, v, plan, 0)
    out, kept = compressed_attention(q, k, v, plan, 0, kernels=TRITON)
    # the budget from an independent low-precision implementation: masked dense SDPA in the same dtype
    budget = error_budget(oracle_attention(q, k, v, plan, 0), ref, floor=16 * torch.finfo(dtype).eps)
    assert_within_budget(out, ref, budget, f"triton select {dtype}")
    assert_within_budget(torch_out, ref, budget, f"torch select {dtype}")
    assert kept.kept.tolist() == pytest.approx(torch_kept.kept.tolist())


def test_the_custom_ops_give_the_same_result_through_triton_and_torch():
    from fkv_compile import ops  # noqa: F401
    from fkv_compile.modes.state import open_session

    plan = HeadPlan.from_roles([["static", "dynamic", "dense", "dynamic"]], frame_tokens=6, chunk_frames=2,
                               segments_per_frame=3, candidate_frames=2)
    q, k, v = torch.randn(2, 4, 12, 16), torch.randn(2, 4, 48, 16), torch.randn(2, 4, 48, 16)
    assert selection_margin(k, plan, 0, 12) > 1e-5
    key = torch.randn(3)
    outs = {}
    for choice in ("torch", "triton"):
        options = {"plan": plan, "kernels": choice, "lowering": "eager"}
        s = open_session(options, None, Config.from_options)
        s.new_site(graph=0, node="sdpa", pattern="cache-window", action="rewritten", layer_key="param")
        outs[choice] = torch.ops.fkv.select_attention(q, k, v, key, s.id, 0, None)
        assert s.kernels(q.device).triton == (choice == "triton")
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-5, atol=1e-5)


def test_dispatch_rules():
    assert kernels_for("auto", "cpu") is TORCH and kernels_for("torch", "cpu") is TORCH
    assert kernels_for("triton", "cpu").triton and kernels_for("triton", "cpu") is kernels_for("triton", "cpu")
    assert kernels_for("torch", "cuda") is TORCH
    with pytest.raises(KernelsError, match="expected one of"):
        kernels_for("cuda", "cpu")


def test_forcing_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kernels_for.cache_clear()
    try:
        with pytest.raises(KernelsError, match="TRITON_INTERPRET=1"):
            kernels_for("triton", "cpu")
    finally:
        kernels_for.cache_clear()


def test_the_kernels_option_and_environment_are_validated(monkeypatch):
    plan = HeadPlan.uniform("static", num_layers=1, num_heads=1, frame_tokens=2, chunk_frames=1)
    assert Config.from_options({"plan": plan}).kernels == "auto"
    assert Config.from_options({"plan": plan, "kernels": "triton"}).kernels == "triton"
    with pytest.raises(OptionsError, match="option kernels expected"):
        Config.from_options({"plan": plan, "kernels": "cuda"})
    monkeypatch.setenv("FKV_KERNELS", "triton")
    assert Config.from_options({"plan": plan}).kernels == "triton"
    monkeypatch.setenv("FKV_KERNELS", "fast")
    with pytest.raises(OptionsError, match="FKV_KERNELS"):
        Config.from_options({"plan": plan})


# -- the persisted autotune cache ------------------------------------------------------------------------

def _two_config_attention(cache):
    import triton

    from fkv_compile.kernels import attention

    configs = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1),
               triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return TunedKernel("range_attention", attention._range_attention_kernel, configs,
                       key=["HEAD_DIM", "Lq", "PRECISION"], cache=cache)


def _run(monkeypatch, tuned):
    from fkv_compile.kernels import attention

    monkeypatch.setattr(attention, "ATTENTION", tuned)
    q, k = torch.randn(1, 1, 8, 16), torch.randn(1, 1, 20, 16)
    starts, ends = torch.tensor([[[2]]]), torch.tensor([[[17]]])
    out = range_attention(q, k, k, starts, ends)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k[:, :, 2:17], k[:, :, 2:17]))


def test_tuning_is_written_then_reloaded_without_benchmarking(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    first = _two_config_attention(TuningCache(path))
    _run(monkeypatch, first)
    assert first.benchmarked == 1
    data = json.loads(path.read_text())
    (entry,) = data["entries"]
    assert entry["kernel"] == "range_attention" and entry["machine"]["device"] == "triton-interpreter"
    assert entry["key"][:3] == [16, 8, "ieee"] and "torch.float32" in entry["key"]

    second = _two_config_attention(TuningCache(path))  # a new process: empty in-memory autotune cache
    _run(monkeypatch, second)
    assert second.benchmarked == 0
    assert next(iter(second.autotuner(None, torch.float32, 16).cache.values())).kwargs == entry["config"]["kwargs"]


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "someone-else/3", "entries": []}),
                                     json.dumps([1, 2])], ids=["corrupt", "foreign", "wrong-shape"])
def test_a_corrupt_or_foreign_cache_file_is_ignored_with_a_warning(tmp_path, monkeypatch, content):
    path = tmp_path / "tuning.json"
    path.write_text(content)
    tuned = _two_config_attention(TuningCache(path))
    with pytest.warns(UserWarning, match="ignoring it"):
        _run(monkeypatch, tuned)
    assert tuned.benchmarked == 1  # tuned anew, in memory
    assert path.read_text() == content  # and the file someone else may own is left as it was


def test_autotune_can_be_disabled(monkeypatch, tmp_path):
    monkeypatch.setenv("FKV_AUTOTUNE", "0")
    tuned = _two_config_attention(TuningCache(tmp_path / "t.json"))
    assert len(tuned.autotuner(None, torch.float32, 16).configs) == 1
    _run(monkeypatch, tuned)
    assert tuned.benchmarked == 0 and not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("mode", ["select", "compact"])
def test_a_compiled_rollout_through_the_kernels_matches_the_oracle(mode, monkeypatch):
    from rollouts import mixed_plan, run_eager_oracle, to64

    from fkv_compile.kernels import attention
    from fkv_compile.models import MiniConfig, build, make_inputs, rollout

    cfg = MiniConfig(dim=64, num_heads=2, num_layers=2, ffn_dim=128, latent_height=4, latent_width=6,
                     window_frames=12, sink_frames=3)
    model, inputs = build(cfg, seed=0), make_inputs(cfg, batch=2, chunks=6, seed=0)
    plan = mixed_plan(cfg)
    reference = run_eager_oracle(*to64(model, inputs)[:1], cfg, to64(model, inputs)[1], plan)
    budget = error_budget(run_eager_oracle(model, cfg, inputs, plan), reference, floor=1e-5)
    compiled = torch.compile(model, backend="forcing_kv",
                             options={"plan": plan, "mode": mode, "lowering": "aot_eager", "kernels": "triton"})
    launches = []
    launch = attention.ATTENTION.launch
    monkeypatch.setattr(attention.ATTENTION, "launch", lambda *a, **kw: launches.append(1) or launch(*a, **kw))
    assert_within_budget(rollout(compiled, cfg, inputs), reference, budget, f"{mode} through the Triton kernels")
    assert len(launches) >= 6 * 4 * cfg.num_layers  # every attention call of every layer (fitting ones)
