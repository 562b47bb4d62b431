"""Cache and attention patterns beyond Self Forcing's: cat-grown caches, hand-written attention."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from rollouts import cases, mixed_plan, oracle_reference, run_eager_oracle, to64

import fkv_compile
from fkv_compile import HeadPlan
from fkv_compile.models import MiniConfig, build, make_inputs, new_caches, rollout
from fkv_compile.models.rollout import DENOISING_STEPS, recache
from fkv_compile.modes.store import StoreError
from fkv_compile.semantics import oracle_attention
from fkv_compile.tools.testing import assert_within_budget, error_budget

BASE = MiniConfig(num_layers=2)
VARIANTS = [pytest.param("slots", "manual", id="slots-manual"), pytest.param("cat", "sdpa", id="cat-sdpa"),
            pytest.param("cat", "manual", id="cat-manual"), pytest.param("absolute", "sdpa", id="causvid")]
WINDOWED = MiniConfig(num_layers=2, window_frames=12, sink_frames=3)


def _variant(style, attention, model):
    cfg = MiniConfig(num_layers=2, cache_style=style, attention=attention)
    m = build(cfg, seed=0)
    m.load_state_dict(model.state_dict())  # the same weights: every variant computes the same function
    return cfg, m


@pytest.fixture(scope="module")
def reference():
    model, inputs = build(BASE, seed=0), make_inputs(BASE, chunks=4, seed=0)
    plan = mixed_plan(BASE)
    m64, in64 = to64(model, inputs)
    ref = run_eager_oracle(m64, BASE, in64, plan)  # the SDPA + preallocated-cache model, in float64
    return model, inputs, plan, ref, error_budget(run_eager_oracle(model, BASE, inputs, plan), ref, floor=1e-5)


@pytest.mark.parametrize("variant,mode", cases(
    [("slots-manual", "select"), ("slots-manual", "oracle"), ("cat-sdpa", "select"), ("cat-manual", "select"),
     ("causvid", "select")],
    variant={"slots-manual": ("slots", "manual"), "cat-sdpa": ("cat", "sdpa"), "cat-manual": ("cat", "manual"),
             "causvid": ("absolute", "sdpa")},
    mode={"select": "select", "oracle": "oracle"}))
def test_every_pattern_matches_the_float64_oracle_over_a_rollout(reference, variant, mode):
    style, attention = variant
    model, inputs, plan, ref, budget = reference
    cfg, m = _variant(style, attention, model)
    compiled = torch.compile(m, backend="forcing_kv", options={"plan": plan, "mode": mode, "lowering": "aot_eager"})
    assert_within_budget(rollout(compiled, cfg, inputs), ref, budget, f"{mode} on {style}/{attention}")
    rep = fkv_compile.report(compiled, print_table=False)
    patterns = {s.pattern.removesuffix(" (+writes)") for s in rep.sites if s.action == "rewritten"}
    expected = f"{'cat-growth' if style == 'cat' else 'cache-window'}, {'matmul-softmax' if attention == 'manual' else 'sdpa'}"
    assert patterns == {expected}
    assert [r.layer for r in rep.layers] == [0, 1] and all(r.kept_ratio < 1 for r in rep.layers)
    assert any("cross-attention" in s.reason for s in rep.sites if s.action == "left alone")


# CI runs one variant per cache style family; --runslow runs every one
@pytest.mark.parametrize("style,attention", [VARIANTS[0], VARIANTS[2],
                                             *(pytest.param(*v.values, id=v.id, marks=pytest.mark.slow)
                                               for v in (VARIANTS[1], VARIANTS[3]))])
def test_off_is_bit_identical_to_inductor(reference, style, attention):
    model, inputs, plan, _, _ = reference
    cfg, m = _variant(style, attention, model)
    expected = rollout(torch.compile(m, backend="inductor"), cfg, inputs)
    torch._dynamo.reset()
    got = rollout(torch.compile(m, backend="forcing_kv", options={"plan": plan, "mode": "off"}), cfg, inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("style,attention", VARIANTS[1:])
def test_global_patterns_run_without_recompiles_after_warm_up(reference, style, attention):
    model, inputs, plan, _, _ = reference
    cfg, m = _variant(style, attention, model)
    cfg_long = MiniConfig(num_layers=2, cache_style=style, attention=attention, num_frames=36)
    long_inputs = make_inputs(cfg_long, chunks=12, seed=1)  # more chunks than dynamo's recompile limit of 8
    long_plan = mixed_plan(cfg_long)
    compiled = torch.compile(m, backend="forcing_kv", options={"plan": long_plan, "lowering": "aot_eager"})
    rollout(compiled, cfg_long, inputs)  # warm-up: the growing dim becomes dynamic
    graphs = fkv_compile.report(compiled, print_table=False).graphs
    with torch.compiler.set_stance("fail_on_recompile"):
        rollout(compiled, cfg_long, long_inputs)
    assert fkv_compile.report(compiled, print_table=False).graphs == graphs


@pytest.fixture(scope="module")
def windowed_reference():
    model, inputs = build(WINDOWED, seed=0), make_inputs(WINDOWED, chunks=7, seed=0)  # rolls from chunk 4 on
    plan = mixed_plan(WINDOWED)
    m64, in64 = to64(model, inputs)
    ref = run_eager_oracle(m64, WINDOWED, in64, plan)
    return model, inputs, plan, ref, error_budget(run_eager_oracle(model, WINDOWED, inputs, plan), ref, floor=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_longlive_clone_and_deferred_write(windowed_reference, attention):
    model, inputs, plan, ref, budget = windowed_reference
    cfg = MiniConfig(num_layers=2, window_frames=12, sink_frames=3, cache_style="longlive", attention=attention)
    m = build(cfg, seed=0)
    m.load_state_dict(model.state_dict())
    compiled = torch.compile(m, backend="forcing_kv", options={"plan": plan, "lowering": "aot_eager"})
    assert_within_budget(rollout(compiled, cfg, inputs), ref, budget, f"select on LongLive v1 ({attention})")
    rep = fkv_compile.report(compiled, print_table=False)
    assert {s.pattern.removesuffix(" (+writes)") for s in rep.sites if s.action == "rewritten"} == {
        f"cat-window, {'matmul-softmax' if attention == 'manual' else 'sdpa'}"}
    assert [r.layer for r in rep.layers] == [0, 1] and all(r.kept_ratio < 1 for r in rep.layers)
    graphs = rep.graphs
    long_inputs = make_inputs(cfg, chunks=12, seed=1)
    with torch.compiler.set_stance("fail_on_recompile"):
        rollout(compiled, cfg, long_inputs)
    assert fkv_compile.report(compiled, print_table=False).graphs == graphs


def test_causvid_absolute_slots_run_compact(reference):
    model, inputs, plan, ref, budget = reference
    cfg, m = _variant("absolute", "sdpa", model)
    compiled = torch.compile(m, backend="forcing_kv", options={"plan": plan, "mode": "compact", "lowering": "aot_eager"})
    for video in range(2):  # the first video's buffers are watched and kept, the second's released
        kv, cross = new_caches(cfg, batch=1, dtype=torch.float32)
        assert_within_budget(rollout(compiled, cfg, inputs, caches=(kv, cross)), ref, budget, "compact on CausVid slots")
        assert all(fkv_compile.is_released(c["k"]) for c in kv) == (video == 1)
    assert {s.action for s in fkv_compile.report(compiled, print_table=False).sites if s.pattern != "-"} == {"compact"}


@pytest.mark.parametrize("attention", ["manual", "varlen"])
def test_compact_owns_the_cache_whatever_the_attention_function(windowed_reference, attention):
    model, inputs, plan, ref, budget = windowed_reference
    cfg = dataclasses.replace(WINDOWED, attention=attention)
    m = build(cfg, seed=0)
    m.load_state_dict(model.state_dict())
    compiled = torch.compile(m, backend="forcing_kv", options={"plan": plan, "mode": "compact", "lowering": "aot_eager"})
    for video in range(2):  # the first video's buffers are watched and kept, the second's released
        kv, cross = new_caches(cfg, batch=1, dtype=torch.float32)
        assert_within_budget(rollout(compiled, cfg, inputs, caches=(kv, cross)), ref, budget, f"compact, {attention}")
        assert all(fkv_compile.is_released(c["k"]) and fkv_compile.is_released(c["v"]) for c in kv) == (video == 1)
    rep = fkv_compile.report(compiled, print_table=False)
    assert {s.action for s in rep.sites if s.pattern != "-"} == {"compact"}


@pytest.mark.parametrize("attention", ["sdpa", pytest.param("manual", marks=pytest.mark.slow)])
def test_compact_owns_a_cat_grown_cache_and_releases_the_grown_tensors(attention):
    """The store adopts what the concatenation would hold; the grown K/V the pipeline keeps are 0-byte tensors of the
    right shape; two videos in a row (the pipeline starts each with empty caches) equal the fp64 oracle."""
    model = build(BASE, seed=0)
    cfg, m = _variant("cat", attention, model)
    plan = mixed_plan(BASE)
    compiled = torch.compile(m, backend="forcing_kv", options={"plan": plan, "mode": "compact", "lowering": "aot_eager"})
    for seed in (0, 1):
        inputs = make_inputs(BASE, chunks=5, seed=seed)
        reference, budget = oracle_reference(model, BASE, inputs, plan)  # the preallocated-cache twin
        kv, cross = new_caches(cfg, batch=1, dtype=torch.float32)
        assert_within_budget(rollout(compiled, cfg, inputs, caches=(kv, cross)), reference, budget,
                             f"compact on a cat-grown cache ({attention}), video {seed}")
        tokens = 5 * cfg.chunk_frames * cfg.frame_tokens
        assert all(c["k"].shape[1] == tokens and fkv_compile.is_released(c["k"]) and fkv_compile.is_released(c["v"])
                   for c in kv)
    rep = fkv_compile.report(compiled, print_table=False)
    assert {s.action for s in rep.sites if s.pattern != "-"} == {"compact"}
    memory = fkv_compile.memory_report(compiled)
    assert memory.dense_bytes == 2 * 2 * tokens * cfg.dim * 4 and 0 < memory.compact_bytes < memory.dense_bytes / 2


# -- the hand-written attention matcher, form by form --------------------------------------------------------

class Attention(torch.nn.Module):
    """One attention over the first ``n`` tokens of a cache, written out in one of several forms."""

    def __init__(self, form):
        super().__init__()
        self.proj, self.form = torch.nn.Linear(8, 8), form

    def forward(self, x, cache, n):
        q = self.proj(x).transpose(1, 2)
        k, v = cache["k"][:, :n].transpose(1, 2), cache["v"][:, :n].transpose(1, 2)
        d = q.shape[-1]
        if self.form == "divide":
            return torch.matmul(F.softmax(torch.matmul(q, k.transpose(2, 3)) / math.sqrt(d), dim=-1), v)
        if self.form == "prescaled":
            return torch.softmax((q * d**-0.5) @ torch.transpose(k, -1, -2), -1, dtype=torch.float32).to(q.dtype) @ v
        if self.form == "no-scale":
            return (q @ k.transpose(-2, -1)).softmax(-1) @ v
        if self.form == "wrong-dim":  # softmax over the queries: not attention
            return (q @ k.transpose(-2, -1)).softmax(-2) @ v
        if self.form == "weights-returned":
            probs = (q @ k.transpose(-2, -1) * d**-0.5).softmax(-1)
            return probs @ v, probs
        raise ValueError(self.form)


FORMS = {"divide": 8**-0.5, "prescaled": 8**-0.5, "no-scale": 1.0}


@pytest.mark.parametrize("form", [*FORMS, "wrong-dim", "weights-returned"])
def test_hand_written_forms(form):
    plan = HeadPlan.from_roles([["static", "dynamic"]], frame_tokens=4, chunk_frames=1, segments_per_frame=2,
                               candidate_frames=1)
    module = Attention(form)
    x = torch.randn(1, 4, 2, 8)
    cache = {"k": torch.randn(1, 24, 2, 8), "v": torch.randn(1, 24, 2, 8)}
    with torch.no_grad():
        eager = module(x, cache, 24)
        compiled = torch.compile(module, backend="forcing_kv", options={"plan": plan, "mode": "oracle", "lowering": "eager"})
        compiled(x, cache, 4)  # the first chunk: a read-only window is trusted in order only from a stream's start
        got = compiled(x, cache, 24)
    sites = fkv_compile.report(compiled, print_table=False).sites
    if form in FORMS:
        q = module.proj(x).transpose(1, 2).detach()
        expected = oracle_attention(q, cache["k"].transpose(1, 2), cache["v"].transpose(1, 2), plan, 0, scale=FORMS[form])
        torch.testing.assert_close(got, expected)
        assert {s.pattern for s in sites} == {"cache-window, matmul-softmax"}
    else:  # not recognised: untouched
        torch.testing.assert_close(got, eager, rtol=0, atol=0)
        assert not sites


def test_rolling_forcing_re_rotated_keys_are_compressed_per_call_and_compact_falls_back_to_select():
    # the window's keys re-rotated at every call and handed to the attention after a graph break, the values a window
    # of the cache: the keep rule applies to each call's keys as they are; the store cannot hold re-rotated keys
    cfg = MiniConfig(num_layers=2, window_frames=12, sink_frames=3, cache_style="rolling")
    model, inputs = build(cfg, seed=0), make_inputs(cfg, chunks=5, seed=0)
    plan = mixed_plan(cfg)
    reference, budget = oracle_reference(model, cfg, inputs, plan)
    for mode in ("select", "compact"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="forcing_kv", options={"plan": plan, "mode": mode,
                                                                       "lowering": "aot_eager"})
        with torch._dynamo.config.patch(recompile_limit=16):  # the re-rotation's grid: a variant per window length
            outputs = rollout(compiled, cfg, inputs)
        assert_within_budget(outputs, reference, budget, f"{mode} on re-rotated keys")
        rep = fkv_compile.report(compiled, print_table=False)
        sites = [s for s in rep.sites if s.pattern != "-"]
        assert sites and {s.pattern.split(",")[0] for s in sites} == {"recomputed-keys"}
        assert [r.layer for r in rep.layers] == [0, 1] and all(r.kept_ratio < 1 for r in rep.layers)
        if mode == "compact":
            assert all(s.action == "select" and "recomputed-keys: keys transformed from the cache" in s.reason
                       for s in sites)


def test_flash_attn_varlen_calls_are_rewritten(windowed_reference):
    model, inputs, plan, ref, budget = windowed_reference
    cfg = MiniConfig(num_layers=2, window_frames=12, sink_frames=3, attention="varlen")
    m = build(cfg, seed=0)
    m.load_state_dict(model.state_dict())
    compiled = torch.compile(m, backend="forcing_kv", options={"plan": plan, "lowering": "aot_eager"})
    assert_within_budget(rollout(compiled, cfg, inputs), ref, budget, "select on flash-attn varlen calls")
    rep = fkv_compile.report(compiled, print_table=False)
    assert {s.pattern for s in rep.sites if s.action == "rewritten"} == {"cache-window, flash-attn-varlen (+writes)"}
    assert [r.layer for r in rep.layers] == [0, 1]
    graphs = rep.graphs
    with torch.compiler.set_stance("fail_on_recompile"):
        rollout(compiled, cfg, make_inputs(cfg, chunks=8, seed=1))  # the window (4 chunks) rolls 4 times
    assert fkv_compile.report(compiled, print_table=False).graphs == graphs
    torch._dynamo.reset()
    expected = rollout(torch.compile(m, backend="inductor"), cfg, inputs)
    torch._dynamo.reset()
    got = rollout(torch.compile(m, backend="forcing_kv", options={"plan": plan, "mode": "off"}), cfg, inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_a_causal_varlen_call_is_left_alone_and_strict_names_it():
    from fkv_compile.models.flash_standin import register

    register()

    class Causal(torch.nn.Module):
        def forward(self, q, cache):
            b, lq, lk = q.shape[0], q.shape[1], 12
            cu_q = torch.tensor([i * lq for i in range(b + 1)], dtype=torch.int32)
            cu_k = torch.tensor([i * lk for i in range(b + 1)], dtype=torch.int32)
            k, v = cache["k"][:, :lk], cache["v"][:, :lk]
            return torch.ops.flash_attn._flash_attn_varlen_forward(
                q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, lq, lk, 0.0, 0.5, True)[0]

    causal = Causal()

    plan = HeadPlan.from_roles([["static", "static"]], frame_tokens=4, chunk_frames=1)
    q, cache = torch.randn(1, 4, 2, 8), {"k": torch.randn(1, 12, 2, 8), "v": torch.randn(1, 12, 2, 8)}
    compiled = torch.compile(causal, backend="forcing_kv", options={"plan": plan, "lowering": "eager"})
    torch.testing.assert_close(compiled(q, cache), causal(q, cache), rtol=0, atol=0)
    (site,) = fkv_compile.report(compiled, print_table=False).sites
    assert site.action == "left alone" and site.reason == "flash-attn varlen call with causal set"
    torch._dynamo.reset()
    strict = torch.compile(causal, backend="forcing_kv", options={"plan": plan, "lowering": "eager", "strict": True})
    with pytest.raises(Exception, match="strict: attention .* left dense: flash-attn varlen call with causal set"):
        strict(q, cache)


LONGLIVE2 = MiniConfig(num_layers=2, window_frames=12, sink_frames=3, index_style="int")


def test_longlive2_python_int_positions_compile_once_with_the_default_dynamic():
    # LongLive 2.0 keeps positions as Python ints; with dynamic=None (default) they become symbolic after
    # the first recompile, so a long rollout then runs without recompiles and always through the pass
    model, plan = build(LONGLIVE2, seed=0), mixed_plan(LONGLIVE2)
    warm, long_inputs = make_inputs(LONGLIVE2, chunks=5, seed=0), make_inputs(LONGLIVE2, chunks=9, seed=1)
    compiled = torch.compile(model, backend="forcing_kv", options={"plan": plan, "lowering": "aot_eager"})
    rollout(compiled, LONGLIVE2, warm)
    graphs = fkv_compile.report(compiled, print_table=False).graphs
    with torch.compiler.set_stance("fail_on_recompile"):
        outs = rollout(compiled, LONGLIVE2, long_inputs)  # more chunk positions than the recompile limit
    rep = fkv_compile.report(compiled, print_table=False)
    assert rep.graphs == graphs and not any(f.at_limit for f in rep.frames)
    m64, in64 = to64(model, long_inputs)
    ref = run_eager_oracle(m64, LONGLIVE2, in64, plan)
    assert_within_budget(outs, ref, error_budget(run_eager_oracle(model, LONGLIVE2, long_inputs, plan), ref, floor=1e-5),
                         "select, Python-int positions")


def test_longlive2_dynamic_false_recompiles_per_chunk_and_the_report_says_so():
    # dynamic=False specializes every position: a recompile per chunk until dynamo's limit, after which
    # the frame runs eagerly with dense attention. The pass warns, the report flags it, strict raises.
    model, plan = build(LONGLIVE2, seed=0), mixed_plan(LONGLIVE2)
    inputs = make_inputs(LONGLIVE2, chunks=5, seed=0)
    with torch._dynamo.config.patch(recompile_limit=3):
        compiled = torch.compile(model, backend="forcing_kv", dynamic=False,
                                 options={"plan": plan, "lowering": "aot_eager"})
        # the warning names the Python ints the frame recompiled on, as dynamic_sources takes them
        with pytest.warns(fkv_compile.RecompileLimitWarning,
                          match=r"dynamic_sources = \"[^\"]*L\['current_start'\][^\"]*\""):
            outs = rollout(compiled, LONGLIVE2, inputs)
        rep = fkv_compile.report(compiled, print_table=False)
        limited = [f for f in rep.frames if f.at_limit]
        assert limited and all(f.compiles == 3 for f in limited)
        assert rep.recompiles >= 2 * len(limited) and "hit torch._dynamo.config.recompile_limit" in rep.table()
        # past the limit the later chunks ran dense, without the pass: why it must not be silent
        forwards = []
        hook = model.register_forward_pre_hook(lambda *_: forwards.append(1))
        rollout(model, LONGLIVE2, inputs)
        hook.remove()
        assert len(outs) == 5 and all(r.calls < len(forwards) for r in rep.layers)
        torch._dynamo.reset()
        strict = torch.compile(model, backend="forcing_kv", dynamic=False,
                               options={"plan": plan, "lowering": "aot_eager", "strict": True})
        with pytest.raises(Exception, match="strict: .*recompile_limit"):
            rollout(strict, LONGLIVE2, inputs)


LONGLIVE_LORA = MiniConfig(num_layers=2, window_frames=12, sink_frames=3, cache_style="longlive", lora_rank=4)


def test_kv_recache_keeps_the_sink_and_recomputes_the_window():
    cfg = dataclasses.replace(LONGLIVE_LORA, cache_style="slots")
    model, inputs = build(cfg, seed=0), make_inputs(cfg, chunks=6, seed=0)
    kv, cross = new_caches(cfg, batch=1, dtype=torch.float32)
    history = rollout(model, cfg, inputs, caches=(kv, cross))
    before = [c["k"].clone() for c in kv]
    sink = cfg.sink_frames * cfg.frame_tokens
    recache(model, cfg, history, torch.randn_like(inputs.context), kv, cross)
    for layer, (cache, old) in enumerate(zip(kv, before)):
        assert torch.equal(cache["k"][:, :sink], old[:, :sink]), "the sink is protected"
        if layer:  # layer 0's keys come before any cross-attention: the prompt cannot change them
            changed = (cache["k"][:, sink:] - old[:, sink:]).abs().amax(dim=(-2, -1))  # per token
            assert bool((changed > 1e-3).all()), "every token after the sink is recomputed under the new prompt"
        assert cache["global_end_index"].item() == 6 * cfg.chunk_frames * cfg.frame_tokens
        assert cache["local_end_index"].item() == cache["k"].shape[1] and cache["recache"] is False


def test_longlive_with_lora_and_kv_recache_after_prompt_switches():
    # LongLive v1 as run: clone-and-defer cache, unmerged LoRA on every Linear of a block, and a prompt
    # switch before the window rolls (chunk 2) and after (chunk 6), each followed by a KV-recache
    cfg = LONGLIVE_LORA
    twin = dataclasses.replace(cfg, cache_style="slots")  # the same function with Self Forcing's cache
    model, twin_model = build(cfg, seed=0), build(twin, seed=0)
    twin_model.load_state_dict(model.state_dict())
    inputs, plan = make_inputs(cfg, chunks=7, seed=0, switch_at=(2, 6)), mixed_plan(cfg)
    m64, in64 = to64(twin_model, inputs)
    ref = run_eager_oracle(m64, twin, in64, plan)
    budget = error_budget(run_eager_oracle(twin_model, twin, inputs, plan), ref, floor=1e-5)
    compiled = torch.compile(model, backend="forcing_kv", options={"plan": plan, "lowering": "aot_eager"})
    assert_within_budget(rollout(compiled, cfg, inputs), ref, budget, "select, LongLive + LoRA + KV-recache")
    rep = fkv_compile.report(compiled, print_table=False)
    assert {s.pattern for s in rep.sites if s.action == "rewritten"} == {"cat-window, sdpa"}  # writes: the clone's
    forwards = 7 * (len(DENOISING_STEPS) + 1) + 2 + 4  # chunks, then the recached chunks of both switches
    assert [r.calls for r in rep.layers] == [forwards] * cfg.num_layers and all(r.dense_calls == 0 for r in rep.layers)
    with torch.compiler.set_stance("fail_on_recompile"):  # the first video warmed up switches and recaches
        rollout(compiled, cfg, make_inputs(cfg, chunks=10, seed=1, switch_at=(3, 8)))
    assert fkv_compile.report(compiled, print_table=False).graphs == rep.graphs
    torch._dynamo.reset()
    compact = torch.compile(twin_model, backend="forcing_kv", options={"plan": plan, "mode": "compact",
                                                                       "lowering": "aot_eager"})
    with pytest.raises(StoreError, match="KV-recache.*mode='select'"):
        rollout(compact, twin, inputs)


@pytest.mark.parametrize("attention", ["sdpa", pytest.param("manual", marks=pytest.mark.slow)])
def test_longlive_off_is_bit_identical_to_inductor_through_a_prompt_switch(attention):
    cfg = dataclasses.replace(LONGLIVE_LORA, attention=attention)
    model, inputs = build(cfg, seed=0), make_inputs(cfg, chunks=3, seed=0, switch_at=(2,))
    expected = rollout(torch.compile(model, backend="inductor"), cfg, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="forcing_kv", options={"plan": mixed_plan(cfg), "mode": "off"})
    assert all(torch.equal(a, b) for a, b in zip(rollout(compiled, cfg, inputs), expected))
    assert {s.action for s in fkv_compile.report(compiled, print_table=False).sites if s.pattern != "-"} == {"found"}


@pytest.mark.parametrize("where,pattern", [("before-attention", "window-input, sdpa"),
                                           ("after-write", "cache-window, sdpa")])
def test_sites_split_by_a_graph_break_are_followed(windowed_reference, where, pattern):
    # before-attention: the window is sliced in one graph and arrives at the attention's graph as an
    # input (a view of the cache); after-write: the writes and the attention are in different graphs
    model, inputs, plan, ref, budget = windowed_reference
    cfg = dataclasses.replace(WINDOWED, graph_break=where)
    m = build(cfg, seed=0)
    m.load_state_dict(model.state_dict())
    # a break among the index arithmetic compiles its resume frame per (roll, index) variant: 9 in this
    # rollout, over dynamo's default limit (the pass warns about that; this test is about the split)
    with torch._dynamo.config.patch(recompile_limit=16):
        compiled = torch.compile(m, backend="forcing_kv", options={"plan": plan, "lowering": "aot_eager"})
        assert_within_budget(rollout(compiled, cfg, inputs), ref, budget, f"select, graph break {where}")
        rep = fkv_compile.report(compiled, print_table=False)
        assert {s.pattern for s in rep.sites if s.action == "rewritten"} == {pattern}
        assert [r.calls for r in rep.layers] == [len(inputs.noise) * (len(DENOISING_STEPS) + 1)] * 2
        assert rep.graph_breaks > 0 and not any(f.at_limit for f in rep.frames)
        torch._dynamo.reset()
        compact = torch.compile(m, backend="forcing_kv", options={"plan": plan, "mode": "compact", "lowering": "aot_eager"})
        kv, cross = new_caches(cfg, batch=1, dtype=torch.float32)
        assert_within_budget(rollout(compact, cfg, inputs, caches=(kv, cross)), ref, budget, "compact falls back")
    rep = fkv_compile.report(compact, print_table=False)
    assert {s.action for s in rep.sites if s.pattern != "-"} == {"select"}, "the writes are not in the attention's graph"
    assert not fkv_compile.is_released(kv[0]["k"])


@pytest.mark.parametrize("cfg", [
    pytest.param(LONGLIVE2, id="python-int-positions", marks=pytest.mark.slow),
    pytest.param(dataclasses.replace(WINDOWED, graph_break="before-attention"), id="window-input"),
    # Rolling Forcing is left alone in every mode: test_rolling_forcing_... checks it untouched by default
    pytest.param(dataclasses.replace(WINDOWED, cache_style="rolling"), id="rolling-forcing", marks=pytest.mark.slow),
])
def test_off_is_bit_identical_to_inductor_on_the_other_patterns(cfg):
    model, inputs = build(cfg, seed=0), make_inputs(cfg, chunks=5, seed=0)  # chunk 4 rolls the window
    expected = rollout(torch.compile(model, backend="inductor"), cfg, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="forcing_kv", options={"plan": mixed_plan(cfg), "mode": "off"})
    assert all(torch.equal(a, b) for a, b in zip(rollout(compiled, cfg, inputs), expected))


_TABLE = {i: float(i) for i in range(64)}


class _PositionKeyedTable(torch.nn.Module):
    """A per-frame table looked up by ``start // 4`` (LongLive 2.0's RoPE frequency cache): the lookup pins the
    dynamic position to a value, so every new frame recompiles whatever ``dynamic`` is."""

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        return x * _TABLE[start // 4]


def test_a_lookup_keyed_by_a_position_is_named_when_it_brings_a_frame_to_the_recompile_limit():
    compiled = torch.compile(_PositionKeyedTable(), backend="forcing_kv", options={"lowering": "aot_eager"})
    with torch._dynamo.config.patch(recompile_limit=3), pytest.warns(
            fkv_compile.RecompileLimitWarning, match=r"pins \(L\['start'\]//4\) \(return x \* _TABLE"):
        for start in range(0, 40, 4):
            compiled(torch.ones(2), start)


class _Anchored(torch.nn.Module):
    """Rolling Forcing's keys: ``cat([anchor, cache[:, a:b], new])``, the anchor the cache's first frame transformed
    at every call (here scaled; Rolling Forcing re-rotates it to sit just before the window)."""

    def __init__(self, attention=F.scaled_dot_product_attention):
        super().__init__()
        self.attention = attention

    def forward(self, q, k_new, v_new, cache, start: int):
        anchor = cache["k"][:, :4] * 0.5
        k = torch.cat([anchor, cache["k"][:, start:16], k_new], dim=1)
        v = torch.cat([cache["v"][:, :4], cache["v"][:, start:16], v_new], dim=1)
        return self.attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def test_an_anchored_window_is_compressed_when_the_query_is_one_chunk_and_exactly_dense_otherwise():
    plan = HeadPlan.from_roles([["static", "dynamic"]], frame_tokens=4, chunk_frames=1, segments_per_frame=2,
                               candidate_frames=2)
    gen = torch.Generator().manual_seed(0)
    cache = {name: torch.randn(1, 16, 2, 8, generator=gen, dtype=torch.float64) for name in "kv"}
    oracle = _Anchored(lambda q, k, v: oracle_attention(q, k, v, plan, 0))
    for mode in ("select", "compact"):
        torch._dynamo.reset()
        compiled = torch.compile(_Anchored(), backend="forcing_kv", options={"plan": plan, "mode": mode,
                                                                             "lowering": "eager"})
        for chunks in (1, 2):  # a one-chunk query: the keep rule; two chunks (Rolling Forcing's window): dense
            q, k_new, v_new = (torch.randn(1, 4 * chunks, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
            got = compiled(q, k_new, v_new, cache, 4)
            expected = (oracle if chunks == 1 else _Anchored())(q, k_new, v_new, cache, 4)
            torch.testing.assert_close(got, expected)
            if chunks == 1:  # the rule drops tokens here: the comparison can tell
                assert (got - _Anchored()(q, k_new, v_new, cache, 4)).abs().max() > 1e-3
        sites = [s for s in fkv_compile.report(compiled, print_table=False).sites if s.pattern != "-"]
        assert sites and {s.pattern for s in sites} == {"anchored-window, sdpa"}
        assert {s.action for s in sites} == {"select" if mode == "compact" else "rewritten"}


RING = MiniConfig(num_layers=2, window_frames=12, sink_frames=3, cache_style="ring")


def test_a_ring_buffer_is_compressed_while_written_in_order_and_exactly_dense_once_a_write_lands_inside():
    # StreamDiffusionV2's op sequence: appended until full, then each chunk over the next slot after the sink, the
    # window (the whole filled buffer) cut in an earlier graph; the oracle runs dense where the window is not written
    # front to back, as the pass must
    model, inputs = build(RING, seed=0), make_inputs(RING, chunks=7, seed=0)  # full after 4 chunks, 3 ring writes
    plan = mixed_plan(RING)
    ref, budget = oracle_reference(model, RING, inputs, plan)
    with torch._dynamo.config.patch(recompile_limit=16):
        compiled = torch.compile(model, backend="forcing_kv", options={"plan": plan, "lowering": "aot_eager"})
        assert_within_budget(rollout(compiled, RING, inputs), ref, budget, "select over a ring buffer")
    rep = fkv_compile.report(compiled, print_table=False)
    assert {s.pattern for s in rep.sites if s.action == "rewritten"} == {"window-input, sdpa"}
    calls_per_chunk = len(DENOISING_STEPS) + 1
    # ring writes into slots 3 and 6 of 0..9 frames/3 are inside the window; the one into the last slot is in order
    assert [r.out_of_order for r in rep.layers] == [2 * calls_per_chunk] * 2
    assert all(r.kept_ratio < 1 for r in rep.layers), "the calls in order are compressed"
    assert "out of written order" in rep.table()
