"""``compact`` on LongLive v1: the staged cache (a clone rolled, written and attended over; the same roll and write
made on the cache after all layers), the cat(sink, window) attention and the KV-recache."""

import dataclasses
import re
import warnings

import pytest
import torch
from rollouts import assert_calls_match_the_oracle_conclusively, mixed_plan, oracle_reference, record_store_calls

import fkv_compile
from fkv_compile import HeadPlan
from fkv_compile.models import MiniConfig, build, make_inputs, new_caches, rollout
from fkv_compile.modes.store import StoreError
from fkv_compile.semantics import oracle_attention
from fkv_compile.tools.testing import assert_within_budget

# LongLive v1 as run: 12-frame window with a 3-frame sink, unmerged LoRA on every Linear of a block
LONGLIVE = MiniConfig(num_layers=2, window_frames=12, sink_frames=3, cache_style="longlive", lora_rank=4)
TWIN = dataclasses.replace(LONGLIVE, cache_style="slots")  # the same function on Self Forcing's cache: the oracle's


def _models():
    model, twin = build(LONGLIVE, seed=0), build(TWIN, seed=0)
    twin.load_state_dict(model.state_dict())
    return model, twin


def _compact(model, **options):
    # release="trust": the buffers go at the first call (watched, they go from the second video: tested below)
    return torch.compile(model, backend="forcing_kv", options={"plan": mixed_plan(LONGLIVE), "mode": "compact",
                                                               "lowering": "aot_eager", "release": "trust", **options})


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
    assert {s.pattern for s in rep.sites if s.pattern != "-"} == {"cat-window, sdpa"}  # written: the clone
    assert rep.compact.startswith(f"{LONGLIVE.num_layers} of {LONGLIVE.num_layers} K/V buffer pairs released")
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
    # Inductor: the write-back graph's replay ops stay live and in order through their tokens
    model, twin = _models()
    inputs = make_inputs(LONGLIVE, chunks=3, seed=0, switch_at=(2,))
    reference, budget = oracle_reference(twin, TWIN, inputs, mixed_plan(TWIN))
    compiled = torch.compile(model, backend="forcing_kv", options={"plan": mixed_plan(LONGLIVE), "mode": "compact",
                                                                   "release": "trust"})
    kv, cross = new_caches(LONGLIVE, batch=1, dtype=torch.float32)
    assert_within_budget(rollout(compiled, LONGLIVE, inputs, caches=(kv, cross)), reference, budget,
                         "compact under Inductor, LongLive + a KV-recache")
    assert all(fkv_compile.is_released(c[name]) for c in kv for name in ("k", "v"))


# -- the guard of a staged cache ----------------------------------------------------------------------------

def test_watched_staged_buffers_are_released_from_the_second_video_and_a_foreign_write_back_leaves_the_layer_dense():
    model, twin = _models()
    plan = mixed_plan(LONGLIVE)
    compiled = torch.compile(model, backend="forcing_kv",
                             options={"plan": plan, "mode": "compact", "lowering": "aot_eager"})
    with torch._dynamo.config.patch(recompile_limit=16):
        for seed, released in ((0, False), (1, True)):  # watched over a whole video, released at the next one
            inputs = make_inputs(LONGLIVE, chunks=6, seed=seed)
            reference, budget = oracle_reference(twin, TWIN, inputs, plan)
            kv, cross = new_caches(LONGLIVE, batch=1, dtype=torch.float32)
            assert_within_budget(rollout(compiled, LONGLIVE, inputs, caches=(kv, cross)), reference, budget,
                                 f"compact on LongLive, watched, video {seed}")
            assert all(fkv_compile.is_released(c[n]) == released for c in kv for n in ("k", "v"))
            if not released:  # kept, the buffers hold what the pipeline wrote back: every slot of the full window
                assert all(bool((c[n].abs().amax(dim=(0, 2, 3)) > 0).all()) for c in kv for n in ("k", "v"))
    assert fkv_compile.report(compiled, print_table=False).graphs > 0
    # a pipeline whose write-back writes something else than its graph wrote on the clone: dense, still right
    torch._dynamo.reset()
    import fkv_compile.models.self_forcing as sf

    original = sf.apply_deferred_cache_updates

    def doubled(kv_caches):
        for cache in kv_caches:
            roll, start, end, new_k, new_v, current = cache["deferred"]
            cache["deferred"] = (roll, start, end, new_k * 2, new_v * 2, current)
        original(kv_caches)

    sf.apply_deferred_cache_updates = doubled
    try:
        other = torch.compile(model, backend="forcing_kv",
                              options={"plan": plan, "mode": "compact", "lowering": "aot_eager"})
        inputs = make_inputs(LONGLIVE, chunks=6, seed=0)
        expected = rollout(model, LONGLIVE, inputs)  # eager, dense: the pipeline as written
        with torch._dynamo.config.patch(recompile_limit=16):
            got = rollout(other, LONGLIVE, inputs)
    finally:
        sf.apply_deferred_cache_updates = original
    assert max(float((a - b).abs().max()) for a, b in zip(got, expected)) > 0  # compression still changes it
    rep = fkv_compile.report(other, print_table=False)
    assert "keeps its dense K/V buffers" in rep.compact and "not the roll or write" in rep.compact, rep.compact


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


# LongLive 2.0 as run: positions as Python ints (no graph break), every layer's staged attention and then the
# write-back of every layer's cache in one graph; its window is as long as the cache (a slice of the clone)
LONGLIVE2 = dataclasses.replace(LONGLIVE, cache_style="longlive2", index_style="int", lora_rank=0)
TWIN2 = dataclasses.replace(LONGLIVE2, cache_style="slots")


@pytest.mark.parametrize("mode", ["select", "compact"])
def test_longlive2_write_back_in_the_attention_graph_is_replayed_after_the_store(mode):
    model, twin = build(LONGLIVE2, seed=0), build(TWIN2, seed=0)
    twin.load_state_dict(model.state_dict())
    plan = mixed_plan(LONGLIVE2)
    inputs = make_inputs(LONGLIVE2, chunks=6, seed=0)  # the window rolls from chunk 4 on
    reference, budget = oracle_reference(twin, TWIN2, inputs, plan)
    compiled = torch.compile(model, backend="forcing_kv", options={"plan": plan, "mode": mode, "lowering": "aot_eager"})
    for video in range(2):  # the first video's buffers are watched and kept, the second's released
        kv, cross = new_caches(LONGLIVE2, batch=1, dtype=torch.float32)
        with torch.compiler.set_stance("fail_on_recompile" if video else "default"):
            outputs = rollout(compiled, LONGLIVE2, inputs, caches=(kv, cross))
        assert_within_budget(outputs, reference, budget, f"{mode} on LongLive 2.0, video {video}")
        released = [fkv_compile.is_released(c[name]) for c in kv for name in ("k", "v")]
        assert all(released) == (mode == "compact" and video == 1) and (all(released) or not any(released))
    rep = fkv_compile.report(compiled, print_table=False)
    sites = [s for s in rep.sites if s.pattern != "-"]
    assert {s.action for s in sites} == {"compact" if mode == "compact" else "rewritten"}
    assert {s.pattern for s in sites} == {"cache-window, sdpa (+writes)"}  # the write-back, in the same graph
    assert {s.graph for s in sites} == set(range(rep.graphs))  # no graph without attention


def test_longlive2_compiled_with_dynamic_false_and_with_the_ints_the_warning_names_marked_dynamic_compiles_once():
    # the advice of the recompile-limit warning, followed: the positions it named marked dynamic before the first
    # compile (the limit of 3 brings the warning early; 4 variants are the model's own branches)
    model, plan = build(LONGLIVE2, seed=0), mixed_plan(LONGLIVE2)
    with torch._dynamo.config.patch(recompile_limit=3), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(model, backend="forcing_kv", dynamic=False,
                                 options={"plan": plan, "lowering": "aot_eager"})
        rollout(compiled, LONGLIVE2, make_inputs(LONGLIVE2, chunks=5, seed=0))
    named = [re.search(r'dynamic_sources = "([^"]+)"', str(w.message)) for w in caught
             if issubclass(w.category, fkv_compile.RecompileLimitWarning)]
    sources = ",".join(dict.fromkeys(s for m in named if m for s in m[1].split(",")))
    assert "L['current_start']" in sources
    torch._dynamo.reset()
    twin = build(TWIN2, seed=0)
    twin.load_state_dict(model.state_dict())
    long_inputs = make_inputs(LONGLIVE2, chunks=9, seed=1)  # more chunk positions than the recompile limit
    reference, budget = oracle_reference(twin, TWIN2, long_inputs, plan)
    with torch.compiler.config.patch(dynamic_sources=sources):
        compiled = torch.compile(model, backend="forcing_kv", dynamic=False,
                                 options={"plan": plan, "mode": "compact", "lowering": "aot_eager"})
        rollout(compiled, LONGLIVE2, make_inputs(LONGLIVE2, chunks=5, seed=0))
        graphs = fkv_compile.report(compiled, print_table=False).graphs
        with torch.compiler.set_stance("fail_on_recompile"):
            outputs = rollout(compiled, LONGLIVE2, long_inputs)
    assert_within_budget(outputs, reference, budget, "compact on LongLive 2.0, positions marked dynamic")
    rep = fkv_compile.report(compiled, print_table=False)
    assert rep.graphs == graphs and not any(f.at_limit for f in rep.frames)
    assert {s.action for s in rep.sites if s.pattern != "-"} == {"compact"}


class _StagedAfterAWrite(torch.nn.Module):
    """A staged cache (a clone written and attended over) whose cache input the graph also writes before the
    attention: not LongLive's write-back (which repeats the clone's steps after it), so the store cannot own it."""

    def __init__(self, attention=torch.nn.functional.scaled_dot_product_attention):
        super().__init__()
        self.attention = attention

    def forward(self, q, k_new, v_new, cache):
        cache["k"][:, :12], cache["v"][:, :12] = k_new, v_new
        k, v = cache["k"].clone(), cache["v"].clone()
        k[:, 12:24], v[:, 12:24] = k_new, v_new
        return self.attention(*(t.transpose(1, 2) for t in (q, k[:, :24], v[:, :24]))).transpose(1, 2)


def test_a_staged_cache_written_before_its_attention_falls_back_to_select_exactly():
    plan = HeadPlan.from_roles([["static", "dynamic"]], frame_tokens=4, chunk_frames=3, segments_per_frame=2)
    q, k_new, v_new = (torch.randn(1, 12, 2, 8, dtype=torch.float64) for _ in range(3))
    cache = {"k": torch.randn(1, 24, 2, 8, dtype=torch.float64), "v": torch.randn(1, 24, 2, 8, dtype=torch.float64)}
    oracle = _StagedAfterAWrite(lambda q, k, v: oracle_attention(q, k, v, plan, 0))
    expected = oracle(q, k_new, v_new, {name: t.clone() for name, t in cache.items()})
    compiled = torch.compile(_StagedAfterAWrite(), backend="forcing_kv",
                             options={"plan": plan, "mode": "compact", "lowering": "eager"})
    torch.testing.assert_close(compiled(q, k_new, v_new, cache), expected)
    (site,) = fkv_compile.report(compiled, print_table=False).sites
    assert site.action == "select" and site.reason.endswith("a staged cache written before its attention reads the clone")
