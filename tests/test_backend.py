"""The forcing_kv backend end to end on the Self Forcing-style miniature."""

import dataclasses

import pytest
import torch
from rollouts import (
    GLOBAL,
    LOW_PRECISION,
    WINDOWED,
    assert_calls_match_the_oracle_conclusively,
    mixed_plan,
    oracle_reference,
    record_select_calls,
    run_compiled,
    run_eager_oracle,
    setup,
)

import fkv_compile
from fkv_compile import HeadPlan, PlanError, SiteError
from fkv_compile.models import MiniConfig, build, make_inputs, rollout
from fkv_compile.models.rollout import DENOISING_STEPS
from fkv_compile.tools.testing import assert_within_budget, max_abs_error


def test_off_is_bit_identical_to_inductor():
    model, inputs = setup(WINDOWED, torch.float32)
    plan = mixed_plan(WINDOWED)
    expected = rollout(torch.compile(model, backend="inductor"), WINDOWED, inputs)
    torch._dynamo.reset()
    compiled, got = run_compiled(model, WINDOWED, inputs, plan, "off", lowering="inductor")
    for chunk, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"chunk {chunk} differs"
    rep = fkv_compile.report(compiled, print_table=False)
    assert rep.mode == "off" and not rep.layers
    assert {s.action for s in rep.sites} == {"found", "left alone"}


@pytest.mark.parametrize("cfg", [pytest.param(WINDOWED, id="windowed-sink"), pytest.param(GLOBAL, id="global")])
def test_select_and_oracle_match_the_float64_oracle_over_a_rollout(cfg):
    # float32: a whole rollout sees compression (bf16 and fp16 cannot: their calls are compared one by one below)
    model, inputs = setup(cfg, torch.float32)
    plan = mixed_plan(cfg)
    reference, budget = oracle_reference(model, cfg, inputs, plan)
    _, oracle = run_compiled(model, cfg, inputs, plan, "oracle")
    torch._dynamo.reset()
    compiled, select = run_compiled(model, cfg, inputs, plan, "select")
    assert_within_budget(oracle, reference, budget, "oracle")
    assert_within_budget(select, reference, budget, "select")
    rep = fkv_compile.report(compiled, print_table=False)
    assert [r.layer for r in rep.layers] == list(range(cfg.num_layers))
    assert all(r.kept_tokens < r.dense_tokens and r.dense_calls == 0 for r in rep.layers)


def test_select_under_inductor_matches_oracle():
    cfg = WINDOWED
    model, inputs = setup(cfg, torch.float32, batch=2)
    plan = mixed_plan(cfg, selection="head")
    reference, budget = oracle_reference(model, cfg, inputs, plan)
    _, select = run_compiled(model, cfg, inputs, plan, "select", lowering="inductor")
    assert_within_budget(select, reference, budget, "select (inductor)")


def test_compiled_oracle_equals_eager_oracle():
    model, inputs = setup(GLOBAL, torch.float32)
    plan = mixed_plan(GLOBAL)
    eager = run_eager_oracle(model, GLOBAL, inputs, plan)
    _, compiled = run_compiled(model, GLOBAL, inputs, plan, "oracle", lowering="eager")
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


def test_one_graph_serves_layers_with_different_plans():
    cfg = WINDOWED.__class__(**{**WINDOWED.__dict__, "num_layers": 3})
    model, inputs = setup(cfg, torch.float32)
    plan = HeadPlan.from_roles([["static", "static"], ["dynamic", "dynamic"], ["dense", "dense"]],
                               frame_tokens=cfg.frame_tokens, chunk_frames=cfg.chunk_frames)
    compiled, select = run_compiled(model, cfg, inputs, plan, "select")
    rep = fkv_compile.report(compiled, print_table=False)
    rewritten = [s for s in rep.sites if s.action == "rewritten"]
    assert len(rewritten) < cfg.num_layers * 2  # far fewer graphs than (layer, branch) pairs
    shared = set.intersection(*(set(r.sites) for r in rep.layers))
    assert shared, "no compiled attention graph served every layer"
    f, window = cfg.frame_tokens, 12 * cfg.frame_tokens
    kept = {r.layer: r.kept_tokens for r in rep.layers}
    assert kept[0] == (1 + 1 + 3) * f  # static: sink + recent + chunk
    assert kept[1] == (1 + 1 + 3) * f + 6 * (f // 6)  # dynamic: + 6 selected segments
    assert kept[2] == window  # dense
    eager = run_eager_oracle(model, cfg, inputs, plan)
    assert max_abs_error(select, eager) < 1e-4


def test_whole_rollout_without_recompiles_after_warm_up():
    cfg = WINDOWED
    model, inputs = setup(cfg, torch.float32)
    long_inputs = setup(cfg, torch.float32, seed=1)[1]
    long_inputs.noise = long_inputs.noise * 2  # 12 chunks: more than dynamo's recompile limit of 8
    compiled = torch.compile(model, backend="forcing_kv", options={"plan": mixed_plan(cfg), "lowering": "aot_eager"})
    rollout(compiled, cfg, inputs)  # warm-up video: every branch (append, roll) and position class
    graphs = fkv_compile.report(compiled, print_table=False).graphs
    with torch.compiler.set_stance("fail_on_recompile"):
        rollout(compiled, cfg, long_inputs)
    assert fkv_compile.report(compiled, print_table=False).graphs == graphs


def test_indices_as_python_ints():
    # the index entries of the dict cache hold Python ints instead of tensors read with .item()
    cfg = WINDOWED.__class__(**{**WINDOWED.__dict__, "index_style": "int"})
    model, inputs = setup(cfg, torch.float32)
    plan = mixed_plan(cfg)
    eager = run_eager_oracle(model, cfg, inputs, plan)
    compiled, select = run_compiled(model, cfg, inputs, plan, "select")
    assert max_abs_error(select, eager) < 1e-4
    rep = fkv_compile.report(compiled, print_table=False)
    assert [r.layer for r in rep.layers] == [0, 1] and all(r.dense_calls == 0 for r in rep.layers)


def _assert_model_still_usable(model, cfg, inputs, expected):
    torch._dynamo.reset()
    again = rollout(model, cfg, inputs)
    assert max_abs_error(again, expected) == 0.0


@pytest.mark.parametrize(
    "options, match",
    [
        ({"mode": "profile"}, "in mode 'profile' found attention over a KV cache .* but got no plan"),
        ({"frame_tokens": 24}, "options frame_tokens and chunk_frames go together when there is no plan"),
        ({"frame_tokens": 25, "chunk_frames": 3}, "options frame_tokens=25, chunk_frames=3 do not fit the attention"),
        ({"plan": "PLAN", "speed": 2}, r"unknown options \['speed'\]"),
        ({"plan": 3}, "plan expected a HeadPlan or a path, got int"),
        ({"plan": "PLAN", "mode": "fast"}, "mode expected one of"),
        ({"plan": "PLAN", "lowering": "tvm"}, "lowering expected one of"),
        ({"plan": "PLAN", "strict": "yes"}, "strict expected a bool"),
        ({"plan": "/nonexistent/plan.json"}, "plan.json"),
    ],
)
def test_bad_options_fail_clearly_and_change_nothing(options, match):
    cfg = GLOBAL
    model, inputs = setup(cfg, torch.float32)
    inputs.noise = inputs.noise[:2]
    expected = rollout(model, cfg, inputs)
    options = {k: mixed_plan(cfg) if v == "PLAN" else v for k, v in options.items()}
    compiled = torch.compile(model, backend="forcing_kv", options=options)
    with pytest.raises(Exception, match=match):
        rollout(compiled, cfg, inputs)
    _assert_model_still_usable(model, cfg, inputs, expected)


def test_plan_for_another_model_is_rejected_naming_the_mismatch():
    cfg = GLOBAL
    model, inputs = setup(cfg, torch.float32)
    inputs.noise = inputs.noise[:2]
    expected = rollout(model, cfg, inputs)
    wrong_heads = HeadPlan.uniform("static", num_layers=2, num_heads=12, frame_tokens=cfg.frame_tokens, chunk_frames=3)
    compiled = torch.compile(model, backend="forcing_kv", options={"plan": wrong_heads, "lowering": "aot_eager"})
    with pytest.raises(Exception, match="num_heads: plan has 12, the attention .* has 2"):
        rollout(compiled, cfg, inputs)
    _assert_model_still_usable(model, cfg, inputs, expected)
    for plan, match in (
        (HeadPlan.uniform("static", num_layers=2, num_heads=2, frame_tokens=40, chunk_frames=3),
         "frame_tokens: plan has 40, but the cache .* holds 504 tokens"),
        (HeadPlan.uniform("static", num_layers=2, num_heads=2, frame_tokens=cfg.frame_tokens, chunk_frames=3,
                          sink_frames=20), "static budget: keeps 24 frames, more than the model's window of 21"),
        ("self-forcing", "num_heads: plan has 12, the attention .* has 2"),  # a bundled plan, validated as any
    ):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="forcing_kv", options={"plan": plan, "lowering": "aot_eager"})
        with pytest.raises(Exception, match=match):
            rollout(compiled, cfg, inputs)
        _assert_model_still_usable(model, cfg, inputs, expected)
    for layers, match in ((4, "num_layers: plan has 4, the model ran 2"), (1, "num_layers: plan has 1, the model runs more")):
        torch._dynamo.reset()
        plan = HeadPlan.uniform("static", num_layers=layers, num_heads=2, frame_tokens=cfg.frame_tokens, chunk_frames=3)
        compiled = torch.compile(model, backend="forcing_kv", options={"plan": plan, "lowering": "aot_eager"})
        with pytest.raises(PlanError, match=match):
            rollout(compiled, cfg, inputs)
        _assert_model_still_usable(model, cfg, inputs, expected)


class MaskedCacheAttention(torch.nn.Module):
    """Attention over a cache window with an explicit mask: found, but not rewritable."""

    def forward(self, q, cache_k, cache_v, end: int):
        mask = torch.ones(q.shape[2], end, dtype=torch.bool)
        return torch.nn.functional.scaled_dot_product_attention(
            q, cache_k[:, :end].transpose(1, 2), cache_v[:, :end].transpose(1, 2), attn_mask=mask)


def test_unsupported_attention_is_left_alone_and_reported_or_raises_in_strict_mode():
    plan = HeadPlan.uniform("static", num_layers=1, num_heads=2, frame_tokens=4, chunk_frames=1)
    q, ck, cv = torch.randn(1, 2, 4, 8), torch.randn(1, 16, 2, 8), torch.randn(1, 16, 2, 8)
    module = MaskedCacheAttention()
    expected = module(q, ck, cv, 12)
    compiled = torch.compile(module, backend="forcing_kv", options={"plan": plan, "lowering": "eager"})
    assert torch.equal(compiled(q, ck, cv, 12), expected)
    (site,) = fkv_compile.report(compiled, print_table=False).sites
    assert site.action == "left alone" and "attn_mask" in site.reason
    torch._dynamo.reset()
    strict = torch.compile(module, backend="forcing_kv", options={"plan": plan, "lowering": "eager", "strict": True})
    with pytest.raises(Exception, match="strict: attention .* left dense: attention has an explicit attn_mask") as info:
        strict(q, ck, cv, 12)
    assert isinstance(getattr(info.value, "inner_exception", info.value), SiteError)  # dynamo wraps what we raise


def test_report_prints_a_table(capsys):
    model, inputs = setup(GLOBAL, torch.float32)
    inputs.noise = inputs.noise[:3]
    compiled, _ = run_compiled(model, GLOBAL, inputs, mixed_plan(GLOBAL), "select")
    rep = fkv_compile.report(compiled)
    printed = capsys.readouterr().out
    assert printed.strip() == rep.table().strip()
    assert "kept/dense tokens" in printed and "rewritten" in printed and "left alone" in printed
    with pytest.raises(ValueError, match="forcing_kv"):
        fkv_compile.report(model)


def test_all_dense_plan_equals_the_uncompressed_model():
    model, inputs = setup(WINDOWED, torch.float32)
    plan = HeadPlan.uniform("dense", num_layers=2, num_heads=2, frame_tokens=WINDOWED.frame_tokens, chunk_frames=3)
    expected = rollout(torch.compile(model, backend="aot_eager"), WINDOWED, inputs)
    torch._dynamo.reset()
    _, got = run_compiled(model, WINDOWED, inputs, plan, "select")
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cfg,dtype", LOW_PRECISION)
def test_select_keeps_the_right_tokens_in_low_precision_call_by_call(cfg, dtype, monkeypatch):
    calls = record_select_calls(monkeypatch)
    model, inputs = setup(cfg, dtype)
    plan = mixed_plan(cfg)
    run_compiled(model, cfg, inputs, plan, "select")
    assert_calls_match_the_oracle_conclusively(calls, plan)


def test_select_chooses_once_per_chunk_and_again_after_a_roll_a_recache_and_a_new_video(monkeypatch):
    # a chunk's later calls reuse its layer's kept ranges; every call is checked against the float64 oracle on its
    # own window, so a selection kept past a new chunk, a roll (chunks 4-6), a KV-recache (before chunk 5) or into a
    # new video fails here; a plan whose choice reads the current chunk (no recent frame) never reuses
    calls = record_select_calls(monkeypatch)
    model, _ = setup(WINDOWED, torch.float32)
    plan = mixed_plan(WINDOWED)
    compiled = torch.compile(model, backend="forcing_kv", options={"plan": plan, "mode": "select", "lowering": "aot_eager"})
    for seed, chunks, switches in ((0, 7, (5,)), (1, 2, ())):
        rollout(compiled, WINDOWED, make_inputs(WINDOWED, chunks=chunks, seed=seed, switch_at=switches))
    assert_calls_match_the_oracle_conclusively(calls, plan)
    rep = fkv_compile.report(compiled, print_table=False)
    chosen, reused, whole = rep.selections
    # a window of one chunk (a video's first, the recache of the first) has no history: every head keeps all of it,
    # those calls need no ranges (the plan's sink and recent frames are fewer than a chunk's)
    assert whole == sum(k.shape[2] == q.shape[2] for q, k, *_ in calls) > 0, rep.selections
    assert chosen + reused + whole == len(calls) and reused >= 0.5 * len(calls), rep.selections
    assert (f"kept ranges: chosen in {chosen} calls, reused in {reused} (a chunk's later calls over the same "
            f"history), none needed in {whole}") in rep.table()

    torch._dynamo.reset()
    reading_the_chunk = mixed_plan(WINDOWED, dynamic_recent_frames=0)
    compiled, _ = run_compiled(model, WINDOWED, make_inputs(WINDOWED, chunks=5, seed=2), reading_the_chunk, "select")
    # never reused: the first chunk needs no ranges, every later chunk's choice reads the chunk's first frame
    chosen, reused, whole = fkv_compile.report(compiled, print_table=False).selections
    assert reused == 0 and whole == WINDOWED.num_layers * (len(DENOISING_STEPS) + 1) and chosen == 4 * whole


_STAGED = MiniConfig(num_layers=2, window_frames=12, sink_frames=3, cache_style="longlive")


@pytest.mark.parametrize("cfg,twin", [
    pytest.param(WINDOWED, WINDOWED, id="slots-and-rolls"),
    pytest.param(MiniConfig(num_layers=2, cache_style="cat"), MiniConfig(num_layers=2), id="cat-grown",
                 marks=pytest.mark.slow),
    pytest.param(_STAGED, dataclasses.replace(_STAGED, cache_style="slots"), id="staged-and-replayed",
                 marks=pytest.mark.slow),
])
def test_the_inserted_ops_work_under_max_autotune_and_dynamic_true(cfg, twin):
    # every op the pass inserts for the cache family (select's fused write and attention, compact's store, roll,
    # grown, staged and replay ops), lowered by Inductor in max-autotune with dynamic=True; the reference is the
    # oracle of the twin model on Self Forcing's cache (the same function and weights)
    model = build(twin, seed=0)
    m = build(cfg, seed=0)
    m.load_state_dict(model.state_dict())
    inputs, plan = make_inputs(cfg, chunks=5, seed=0), mixed_plan(cfg)
    reference, budget = oracle_reference(model, twin, inputs, plan)
    for mode, action in (("select", "rewritten"), ("compact", "compact")):
        torch._dynamo.reset()
        compiled = torch.compile(m, backend="forcing_kv", dynamic=True,
                                 options={"plan": plan, "mode": mode, "inductor_mode": "max-autotune"})
        with torch.no_grad():
            assert_within_budget(rollout(compiled, cfg, inputs), reference, budget, f"{mode}, max-autotune, dynamic")
        assert action in {s.action for s in fkv_compile.report(compiled, print_table=False).sites}


@pytest.mark.parametrize("options,message", [
    ({"inductor_mode": "fastest"}, "option inductor_mode expected one of"),
    ({"inductor_mode": "max-autotune", "lowering": "aot_eager"}, "needs lowering='inductor'"),
])
def test_an_inductor_mode_is_an_option_and_a_wrong_one_is_named(options, message):
    with pytest.raises(fkv_compile.OptionsError, match=message):
        fkv_compile.Config.from_options(options)
