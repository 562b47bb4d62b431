"""``compact`` on LongLive v1: the clone-and-defer cache, the cat(sink, window) attention and the KV-recache."""

import dataclasses

import pytest
import torch
from rollouts import assert_calls_match_the_oracle_conclusively, mixed_plan, oracle_reference, record_store_calls

import fkv_compile
from fkv_compile.models import MiniConfig, build, make_inputs, new_caches, rollout
from fkv_compile.modes.deferred import DeferredClones
from fkv_compile.modes.store import StoreError
from fkv_compile.passes.deferred import elide_clones, erase_self_copies, find_deferred_clones
from fkv_compile.tools.testing import assert_within_budget

# LongLive v1 as run: 12-frame window with a 3-frame sink, unmerged LoRA on every Linear of a block
LONGLIVE = MiniConfig(num_layers=2, window_frames=12, sink_frames=3, cache_style="longlive", lora_rank=4)
TWIN = dataclasses.replace(LONGLIVE, cache_style="slots")  # the same function on Self Forcing's cache: the oracle's


def _models():
    model, twin = build(LONGLIVE, seed=0), build(TWIN, seed=0)
    twin.load_state_dict(model.state_dict())
    return model, twin


def _compact(model, **options):
    return torch.compile(model, backend="forcing_kv",
                         options={"plan": mixed_plan(LONGLIVE), "mode": "compact", "lowering": "aot_eager", **options})


def test_compact_serves_longlive_through_two_prompt_switches_from_the_store():
    # a prompt switch before the window rolls (chunk 2) and one after (chunk 6), each followed by a KV-recache
    model, twin = _models()
    inputs = make_inputs(LONGLIVE, chunks=7, seed=0, switch_at=(2, 6))
    reference, budget = oracle_reference(twin, TWIN, inputs, mixed_plan(TWIN))
    compiled = _compact(model)
    kv, cross = new_caches(LONGLIVE, batch=1, dtype=torch.float32)
    with torch._dynamo.config.patch(recompile_limit=16):  # the first call's clone adds one variant (see report)
        outputs = rollout(compiled, LONGLIVE, inputs, caches=(kv, cross))
    assert_within_budget(outputs, reference, budget, "compact, LongLive + LoRA + two KV-recaches")
    assert all(fkv_compile.is_released(c[name]) for c in kv for name in ("k", "v"))
    rep = fkv_compile.report(compiled, print_table=False)
    assert {s.action for s in rep.sites if s.pattern != "-"} == {"compact"}
    assert {s.pattern for s in rep.sites if s.pattern != "-"} == {"cat-window, sdpa (+writes)"}
    assert rep.deferred.startswith("owned by the store") and " cloned in 1 of " in rep.deferred, rep.deferred
    memory = rep.memory
    assert memory.dense_bytes == LONGLIVE.num_layers * 2 * 12 * LONGLIVE.frame_tokens * LONGLIVE.dim * 4
    # the reserve holds the 2 sink frames the keep rule drops (K, V and positions), per static and dynamic head
    # (one head each here); without it the store holds under half the dense window (docs/longlive.md)
    dropped = (LONGLIVE.sink_frames - 1) * LONGLIVE.frame_tokens
    per_head = dropped * (2 * LONGLIVE.head_dim * 4 + 8)
    assert memory.reserve_bytes == LONGLIVE.num_layers * LONGLIVE.num_heads * per_head
    assert memory.compact_bytes - memory.reserve_bytes <= memory.dense_bytes / 2 < memory.compact_bytes


def test_compact_on_longlive_two_videos_batch_two_then_without_the_recache_reserve():
    model, twin = _models()
    plan = mixed_plan(LONGLIVE)
    compiled = _compact(model)
    with torch._dynamo.config.patch(recompile_limit=16):
        for seed, switches in ((0, ()), (1, (3,))):  # a new video (fresh caches), then one with a prompt switch
            inputs = make_inputs(LONGLIVE, batch=2, chunks=6, seed=seed, switch_at=switches)
            reference, budget = oracle_reference(twin, TWIN, inputs, plan)
            kv, cross = new_caches(LONGLIVE, batch=2, dtype=torch.float32)
            assert_within_budget(rollout(compiled, LONGLIVE, inputs, caches=(kv, cross)), reference, budget,
                                 f"compact on LongLive, batch 2, video {seed}")
            assert all(fkv_compile.is_released(c[name]) for c in kv for name in ("k", "v"))
        torch._dynamo.reset()
        frugal = _compact(model, kv_recache=False)
        rollout(frugal, LONGLIVE, make_inputs(LONGLIVE, batch=2, chunks=6, seed=2))  # the window full, rolled
        memory = fkv_compile.memory_report(frugal)
        assert memory.reserve_bytes == 0 < memory.compact_bytes <= memory.dense_bytes / 2
        with pytest.raises(StoreError, match="kv_recache=False dropped the sink frames"):
            rollout(frugal, LONGLIVE, make_inputs(LONGLIVE, batch=2, chunks=3, seed=2, switch_at=(2,)))


def test_compact_on_longlive_keeps_the_right_tokens_call_by_call_through_two_recaches(monkeypatch):
    # the KV-recache's first call attends over the protected sink only and writes nothing, so no rollout output
    # shows it: every call is checked against the float64 oracle on its own inputs (bf16: no rollout could tell)
    calls = record_store_calls(monkeypatch)
    model = build(LONGLIVE, seed=0, dtype=torch.bfloat16)
    inputs = make_inputs(LONGLIVE, chunks=7, seed=0, switch_at=(2, 6), dtype=torch.bfloat16)
    plan = mixed_plan(LONGLIVE)
    with torch._dynamo.config.patch(recompile_limit=16):
        rollout(_compact(model), LONGLIVE, inputs)
    assert len(calls) == LONGLIVE.num_layers * (7 * 5 + 2 + 4)
    assert_calls_match_the_oracle_conclusively(calls, plan)


def test_compact_on_longlive_under_inductor_through_a_prompt_switch():
    # Inductor lowers the clone's graph twice too, and the variant that returns its input must return the cache
    model, twin = _models()
    inputs = make_inputs(LONGLIVE, chunks=3, seed=0, switch_at=(2,))
    reference, budget = oracle_reference(twin, TWIN, inputs, mixed_plan(TWIN))
    compiled = torch.compile(model, backend="forcing_kv", options={"plan": mixed_plan(LONGLIVE), "mode": "compact"})
    kv, cross = new_caches(LONGLIVE, batch=1, dtype=torch.float32)
    assert_within_budget(rollout(compiled, LONGLIVE, inputs, caches=(kv, cross)), reference, budget,
                         "compact under Inductor, LongLive + a KV-recache")
    assert all(fkv_compile.is_released(c[name]) for c in kv for name in ("k", "v"))
    assert fkv_compile.report(compiled, print_table=False).deferred.startswith("owned by the store")


# -- the pieces ------------------------------------------------------------------------------------------------

def _graph(fn, *args) -> torch.fx.GraphModule:
    captured = []

    def backend(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend)(*args)
    return captured[0]


def test_only_clones_of_cache_inputs_that_the_graph_returns_are_deferred():
    cache, x = torch.randn(1, 6, 2, 4), torch.randn(1, 6, 2, 4)
    gm = _graph(lambda c, y: (c.clone(), y * 2), cache, x)
    (clone,) = find_deferred_clones(gm)
    assert clone.output == 0 and clone.source.op == "placeholder"
    elided = elide_clones(gm, [clone])
    out, _ = elided(cache, x)
    assert out is cache and gm(cache, x)[0] is not cache  # the original graph is left as it was
    assert not find_deferred_clones(_graph(lambda c: (c.clone(), c + 1), cache))  # the input is read too
    assert not find_deferred_clones(_graph(lambda c: c.clone().mul_(2), cache))  # the clone is used in the graph
    assert not find_deferred_clones(_graph(lambda c: c.clone(), torch.randn(6, 4)))  # not laid out like a cache


def test_a_self_copy_is_erased_and_nothing_else():
    def write_back(x, y):
        x.copy_(x)
        y.copy_(x)

    gm = _graph(write_back, torch.randn(3), torch.randn(3))
    assert erase_self_copies(gm) == 1
    x, y = (n for n in gm.graph.nodes if n.op == "placeholder")
    assert [n.args for n in gm.graph.nodes if n.target == "copy_"] == [(y, x)]


def test_clones_are_kept_until_a_store_claims_them():
    deferred = DeferredClones()
    cache = torch.randn(1, 6, 2, 4)
    run = deferred.dispatch(0, ["c"], [0], lambda c: (c.clone(),), lambda c: (c,))
    (first,) = run(cache)
    assert first is not cache and torch.equal(first, cache)
    assert not deferred.claim(torch.randn(1, 6, 2, 4), torch.randn(1, 6, 2, 4))  # not what the graph returned
    (second,) = run(cache)
    assert second is not cache  # still unproven: a graph whose clones no store claims keeps cloning
    assert deferred.claim(second, second) and run(cache)[0] is cache
    assert "cloned in 2 of 3 calls" in deferred.summary()


def test_a_compiled_function_returning_a_clone_still_returns_a_copy_in_compact():
    # a model that snapshots its input with clone() across a graph break is not a KV cache: nothing claims it
    def snapshot(x):
        copy = x.clone()
        torch._dynamo.graph_break()
        x.add_(1)
        return copy

    x = torch.randn(1, 6, 2, 4)
    expected = x.clone()
    compiled = torch.compile(snapshot, backend="forcing_kv",
                             options={"plan": mixed_plan(LONGLIVE), "mode": "compact", "lowering": "aot_eager"})
    for _ in range(2):
        before = x.clone()
        assert torch.equal(compiled(x), before) and torch.equal(x, before + 1)
    assert torch.allclose(x, expected + 2)
