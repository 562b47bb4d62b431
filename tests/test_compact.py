"""``compact`` mode end to end: the store replaces the dense caches, which are released."""

import gc

import pytest
import torch
from rollouts import (
    GLOBAL,
    LOW_PRECISION,
    WINDOWED,
    assert_calls_match_the_oracle_conclusively,
    cases,
    mixed_plan,
    oracle_reference,
    record_store_calls,
    run_compiled,
    run_eager_oracle,
    setup,
    to64,
)

import fkv_compile
from fkv_compile import SiteError
from fkv_compile.models import MiniConfig, build, make_inputs, new_caches, rollout
from fkv_compile.tools.policies import policy_plan
from fkv_compile.tools.testing import assert_within_budget, max_abs_error


def run_compact(model, cfg, inputs, plan, lowering="aot_eager", videos=1):
    compiled = torch.compile(model, backend="forcing_kv", options={"plan": plan, "mode": "compact", "lowering": lowering})
    outs, caches = [], []
    for _ in range(videos):
        c = new_caches(cfg, batch=inputs.context.shape[0], dtype=inputs.context.dtype)
        outs.append(rollout(compiled, cfg, inputs, caches=c))
        caches.append(c)
    return compiled, outs, caches


@pytest.mark.parametrize("cfg,batch", cases(
    [("windowed-sink", "batch2"), ("global", "batch1")],
    cfg={"windowed-sink": WINDOWED, "global": GLOBAL}, batch={"batch1": 1, "batch2": 2}))
def test_compact_matches_the_float64_oracle_over_two_videos(cfg, batch):
    # float32: a whole rollout sees compression (bf16 and fp16 cannot: their calls are compared one by one below)
    model, inputs = setup(cfg, torch.float32, batch=batch)
    plan = mixed_plan(cfg)
    reference, budget = oracle_reference(model, cfg, inputs, plan)
    compiled, (first, second), caches = run_compact(model, cfg, inputs, plan, videos=2)
    for video in (first, second):  # the same compiled model, a new video: the store resets
        assert_within_budget(video, reference, budget, "compact")
    rep = fkv_compile.report(compiled, print_table=False)
    assert {s.action for s in rep.sites if s.pattern != "-"} == {"compact"}
    # the first video's buffers are watched, kept and written; once a second video started with nothing else having
    # written them, its buffers are released
    (first_kv, _), (second_kv, _) = caches
    assert not any(fkv_compile.is_released(c[name]) for c in first_kv for name in ("k", "v"))
    assert all(fkv_compile.is_released(c[name]) for c in second_kv for name in ("k", "v"))
    assert "2 of 4 K/V buffer pairs released" in rep.table()


@pytest.mark.parametrize("cfg,dtype", LOW_PRECISION)
def test_compact_keeps_the_right_tokens_in_low_precision_call_by_call(cfg, dtype, monkeypatch):
    calls = record_store_calls(monkeypatch)
    model, inputs = setup(cfg, dtype)
    plan = mixed_plan(cfg)
    run_compact(model, cfg, inputs, plan, videos=2)
    assert_calls_match_the_oracle_conclusively(calls, plan)


def test_dense_buffers_are_released_after_a_watched_video_and_the_store_adds_up_to_the_report():
    cfg = GLOBAL
    model, inputs = setup(cfg, torch.float32)
    inputs.noise = inputs.noise[:2]
    compiled = torch.compile(model, backend="forcing_kv",
                             options={"plan": mixed_plan(cfg), "mode": "compact", "lowering": "aot_eager"})
    watched = new_caches(cfg, batch=1, dtype=torch.float32)
    rollout(compiled, cfg, inputs, caches=watched)  # two chunks: watched, kept, written as the pipeline expects
    assert not any(fkv_compile.is_released(c[name]) for c in watched[0] for name in ("k", "v"))
    assert watched[0][0]["k"].abs().sum() > 0
    del watched  # the pipeline drops the first video's buffers: the report no longer counts them
    gc.collect()
    kv, cross = new_caches(cfg, batch=1, dtype=torch.float32)
    dense_bytes = sum(c[name].nbytes for c in kv for name in ("k", "v"))
    x = inputs.noise[0][0]
    with torch.no_grad():  # the ops are inference-only
        compiled(x, torch.full((1, 3), 1000.0), inputs.context, kv, cross, 0)  # the second video's first call
    assert all(c[name].untyped_storage().nbytes() == 0 for c in kv for name in ("k", "v"))
    mem = fkv_compile.memory_report(compiled)
    assert mem.dense_bytes == dense_bytes and mem.kept_dense_bytes == 0
    # after the first chunk's first write each head group holds just that chunk: K and V (float32) of its heads,
    # and one int64 cache position per token; counted from the plan, not from the store's tensors
    plan, b, t = mixed_plan(cfg), 1, cfg.chunk_frames * cfg.frame_tokens
    groups = [sum(1 for role in row if role == r) for row in plan.roles for r in set(row)]
    assert mem.compact_bytes == sum(b * g * t * cfg.head_dim * 4 * 2 + b * t * 8 for g in groups)
    assert [r.layer for r in mem.rows] == list(range(cfg.num_layers))
    # reading a released buffer from outside fails loudly
    with pytest.raises(RuntimeError, match="out of bounds"):
        kv[0]["k"][:, :5].clone()


def test_memory_is_constant_over_a_long_rollout_and_within_budget():
    cfg = WINDOWED
    model, inputs = setup(cfg, torch.float32)
    long_inputs = setup(cfg, torch.float32, seed=1)[1]
    long_inputs.noise = long_inputs.noise * 3  # 18 chunks: 14 of them with the window full
    plan = mixed_plan(cfg)
    compiled = torch.compile(model, backend="forcing_kv", options={"plan": plan, "mode": "compact", "lowering": "aot_eager"})
    rollout(compiled, cfg, inputs)  # warm-up video: append and roll branches compiled
    sizes = []
    graphs = fkv_compile.report(compiled, print_table=False).graphs
    with torch.compiler.set_stance("fail_on_recompile"):
        out = rollout(compiled, cfg, long_inputs, on_chunk=lambda c: sizes.append(fkv_compile.memory_report(compiled).compact_bytes))
    assert fkv_compile.report(compiled, print_table=False).graphs == graphs
    assert len(set(sizes[4:])) == 1, sizes
    reference, budget = oracle_reference(model, cfg, long_inputs, plan)
    assert_within_budget(out, reference, budget, "compact over 18 chunks")
    mem = fkv_compile.memory_report(compiled)
    # windowed Self Forcing miniature: 12 frames dense; static 5 frames, dynamic 5 + 6 segments of 4 tokens
    assert mem.saved_fraction > 0.5


def test_plans_compact_cannot_serve_fall_back_to_select_and_are_reported():
    cfg = GLOBAL
    model, inputs = setup(cfg, torch.float32)
    inputs.noise = inputs.noise[:4]
    plan = mixed_plan(cfg, dynamic_recent_frames=0)
    compiled, (out,), (caches,) = run_compact(model, cfg, inputs, plan)
    sites = [s for s in fkv_compile.report(compiled, print_table=False).sites if s.pattern != "-"]
    assert all(s.action == "select" and "recent_frames >= 1" in s.reason for s in sites)
    assert not any(fkv_compile.is_released(c["k"]) for c in caches[0])
    torch._dynamo.reset()
    _, select = run_compiled(model, cfg, inputs, plan, "select")
    assert max_abs_error(out, select) == 0.0
    torch._dynamo.reset()
    strict = torch.compile(model, backend="forcing_kv",
                           options={"plan": plan, "mode": "compact", "lowering": "aot_eager", "strict": True})
    with pytest.raises(Exception, match="not compact: compact needs dynamic recent_frames >= 1") as info:
        rollout(strict, cfg, inputs)
    assert isinstance(getattr(info.value, "inner_exception", info.value), SiteError)  # dynamo wraps what we raise


def test_compact_under_inductor():
    cfg = WINDOWED
    model, inputs = setup(cfg, torch.float32)
    plan = mixed_plan(cfg)
    reference, budget = oracle_reference(model, cfg, inputs, plan)
    _, (out,), _ = run_compact(model, cfg, inputs, plan, lowering="inductor")
    assert_within_budget(out, reference, budget, "compact (inductor)")


@pytest.mark.parametrize("policy", cases([("streaming",)], policy={p: p for p in ("streaming", "random", "even")}))
def test_baseline_plans_run_through_the_pass_and_match_their_oracle(policy):
    cfg = WINDOWED
    model, inputs = setup(cfg, torch.float32)
    plan = policy_plan(policy, mixed_plan(cfg))
    assert plan.count("dynamic") == plan.num_layers * plan.num_heads
    reference, budget = oracle_reference(model, cfg, inputs, plan)
    m64, in64 = to64(model, inputs)
    forcing_kv = run_eager_oracle(m64, cfg, in64, mixed_plan(cfg))
    assert max_abs_error(reference, forcing_kv) > 100 * budget, "the baseline keeps other tokens than Forcing-KV"
    _, select = run_compiled(model, cfg, inputs, plan, "select")
    assert_within_budget(select, reference, budget, f"{policy} select")
    torch._dynamo.reset()
    compiled, (outs,), _ = run_compact(model, cfg, inputs, plan)
    assert_within_budget(outs, reference, budget, f"{policy} compact")
    assert {s.action for s in fkv_compile.report(compiled, print_table=False).sites if s.pattern != "-"} == {"compact"}


def test_two_different_videos_with_dense_static_and_dynamic_heads_in_every_layer():
    # a second video with other inputs: tokens the store kept from the first (at the same positions) would change
    # the result; every role in every layer, since a commit drops a compressed group's stale history but a dense
    # group keeps every token from the window's start on
    cfg = MiniConfig(num_layers=2, num_heads=4, window_frames=12, sink_frames=3)
    model = build(cfg, seed=0)
    videos = [make_inputs(cfg, chunks=5, seed=seed) for seed in (0, 1)]
    plan = mixed_plan(cfg)
    assert all(set(row) == {"dense", "static", "dynamic"} for row in plan.roles)
    compiled = torch.compile(model, backend="forcing_kv", options={"plan": plan, "mode": "compact", "lowering": "aot_eager"})
    for inputs in videos:
        reference, budget = oracle_reference(model, cfg, inputs, plan)
        assert_within_budget(rollout(compiled, cfg, inputs), reference, budget, "compact")
