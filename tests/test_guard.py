"""What one compiled graph cannot see, guarded at run time: caches zeroed, rebuilt or swapped by code outside it.

Every rollout here runs a pipeline that does something to its KV buffers the pass never sees, and is compared with
the float64 oracle of the keep rule over the same pipeline (or with the same video run alone).
"""

import pytest
import torch
from rollouts import mixed_plan, oracle_reference, setup

import fkv_compile
from fkv_compile.models import MiniConfig, build, chunks, make_inputs, new_caches, recompute_rollout, rollout
from fkv_compile.models.self_forcing import write_index
from fkv_compile.tools.testing import assert_within_budget, max_abs_error

RECOMPUTE = MiniConfig(num_layers=2, cache_style="recompute", context_frames=3)
WINDOWED = MiniConfig(num_layers=2, window_frames=12, sink_frames=3)
MODES = ["select", "compact"]


def _compiled(model, mode, **options):
    return torch.compile(model, backend="forcing_kv",
                         options={"plan": mixed_plan(model.cfg), "mode": mode, "lowering": "aot_eager", **options})


def _rep(compiled):
    return fkv_compile.report(compiled, print_table=False)


@pytest.mark.parametrize("mode", MODES)
def test_a_cache_rebuilt_from_position_0_at_every_block_matches_the_oracle(mode):
    # Krea-style: each block zeroes the buffers in place, a forward the pass leaves alone (frame-causal mask) rebuilds
    # them from position 0, and the denoising steps write the chunk after it at Python-int slots (fixed once the
    # context is full); 8 blocks, two videos. A selection or a store kept across a rebuild fails here.
    model, _ = setup(RECOMPUTE, torch.float32)
    inputs = make_inputs(RECOMPUTE, chunks=8)
    plan = mixed_plan(RECOMPUTE)
    reference, budget = oracle_reference(model, RECOMPUTE, inputs, plan, run=recompute_rollout)
    compiled = _compiled(model, mode)
    recompute_rollout(compiled, RECOMPUTE, make_inputs(RECOMPUTE, chunks=2, seed=1))  # two blocks compile every shape
    graphs = _rep(compiled).graphs
    with torch.compiler.set_stance("fail_on_recompile"):  # no recompile once the context is full
        for video in range(2):
            assert_within_budget(recompute_rollout(compiled, RECOMPUTE, inputs), reference, budget, f"{mode} {video}")
    rep = _rep(compiled)
    assert rep.graphs == graphs
    chosen, reused, whole = rep.selections
    unordered = sum(row.out_of_order for row in rep.layers)
    # the first step of a block sees a rebuilt cache and chooses; its 3 later steps reuse (blocks 1-7 of each video).
    # compact: a layer whose store gives way to select (the rebuild) first reads its buffers with their history
    # unknown to the order check: that one call runs dense, the next step chooses and the last two reuse
    assert unordered == (0 if mode == "select" else RECOMPUTE.num_layers), rep.layers
    assert reused == 3 * chosen - unordered > 0, (rep.selections, unordered)
    if mode == "compact":
        assert "0 of 6 K/V buffer pairs released" in rep.compact, rep.compact
        assert "written outside the compiled graph" in rep.compact


@pytest.mark.parametrize("mode", MODES)
def test_a_pipeline_that_reuses_its_buffers_zeroed_or_not_between_videos(mode):
    # one set of buffers for three videos; before the second video the pipeline zeroes them (compact must then keep
    # them: released buffers would crash the process on zero_()), before the third it only resets its indices
    model, inputs = setup(WINDOWED, torch.float32)
    plan = mixed_plan(WINDOWED)
    reference, budget = oracle_reference(model, WINDOWED, inputs, plan)
    compiled = _compiled(model, mode)
    kv, cross = caches = new_caches(WINDOWED, batch=1, dtype=torch.float32)
    for video, zero in enumerate((False, True, False)):
        for layer_cache, cross_cache in zip(kv, cross):
            if zero:
                layer_cache["k"].zero_()
                layer_cache["v"].zero_()
            write_index(layer_cache, "global_end_index", 0)
            write_index(layer_cache, "local_end_index", 0)
            cross_cache["is_init"] = False
        assert_within_budget(rollout(compiled, WINDOWED, inputs, caches=caches), reference, budget, f"video {video}")
    if mode == "compact":
        assert not any(fkv_compile.is_released(c["k"]) for c in kv)
        assert "layer 0 keeps its dense K/V buffers" in _rep(compiled).compact


def test_compact_releases_reused_buffers_once_a_second_video_shows_nothing_else_writes_them():
    model, inputs = setup(WINDOWED, torch.float32)
    plan = mixed_plan(WINDOWED)
    reference, budget = oracle_reference(model, WINDOWED, inputs, plan)
    compiled = _compiled(model, "compact")
    kv, cross = caches = new_caches(WINDOWED, batch=1, dtype=torch.float32)
    for video in range(2):
        for layer_cache, cross_cache in zip(kv, cross):  # as Self Forcing's pipeline: indices reset, buffers kept
            write_index(layer_cache, "global_end_index", 0)
            write_index(layer_cache, "local_end_index", 0)
            cross_cache["is_init"] = False
        assert_within_budget(rollout(compiled, WINDOWED, inputs, caches=caches), reference, budget, f"video {video}")
        assert all(fkv_compile.is_released(c["k"]) for c in kv) == (video == 1)
    mem = fkv_compile.memory_report(compiled)
    assert mem.kept_dense_bytes == 0 and mem.saved_fraction > 0.5


@pytest.mark.parametrize("mode", MODES)
def test_one_compiled_model_serves_two_videos_in_turns(mode):
    # a server with two streams: chunk by chunk in turns on one compiled model, each with its own caches; each video
    # must equal the same video run alone through a fresh compiled model (compression itself changes it far more)
    model, _ = setup(WINDOWED, torch.float32)
    videos = [make_inputs(WINDOWED, chunks=6, seed=seed) for seed in (0, 1)]
    alone = []
    for inputs in videos:
        torch._dynamo.reset()
        alone.append(rollout(_compiled(model, mode), WINDOWED, inputs))
    torch._dynamo.reset()
    compiled = _compiled(model, mode)
    together = [list(pair) for pair in zip(*(chunks(compiled, WINDOWED, inputs) for inputs in videos))]
    effect = max_abs_error(rollout(model, WINDOWED, videos[0]), alone[0])
    for i, inputs in enumerate(videos):
        err = max_abs_error([pair[i] for pair in together], alone[i])
        assert effect > 1e-3 and err < effect / 1000, f"video {i}: {err:.2e} vs alone, compression changes {effect:.2e}"
    assert "runs select" not in _rep(compiled).compact  # compact served both streams, each from its own store


def test_compact_new_buffers_of_another_batch_size():
    # a one-chunk video at batch 1, then one at batch 2 in new buffers: never the first video's store for the second
    model = build(WINDOWED)
    compiled = _compiled(model, "compact")
    plan = mixed_plan(WINDOWED)
    for batch in (1, 2, 1):
        inputs = make_inputs(WINDOWED, batch=batch, chunks=2, seed=batch)
        reference, budget = oracle_reference(model, WINDOWED, inputs, plan)
        assert_within_budget(rollout(compiled, WINDOWED, inputs), reference, budget, f"batch {batch}")


@pytest.mark.parametrize("mode", MODES)
def test_a_short_last_chunk_is_served_dense_as_the_keep_rule_says(mode):
    # 5 chunks and a last one of 2 frames, two videos: the keep rule leaves the short chunk dense; compact keeps the
    # dense buffers that can serve it (it may come again in every video) and the layer runs select from then on
    model, inputs = setup(WINDOWED, torch.float32)
    inputs.noise = inputs.noise[:5] + [[n[:, :2] for n in inputs.noise[5]]]
    plan = mixed_plan(WINDOWED)
    reference, budget = oracle_reference(model, WINDOWED, inputs, plan)
    compiled = _compiled(model, mode)
    for video in range(2):
        assert_within_budget(rollout(compiled, WINDOWED, inputs), reference, budget, f"{mode} video {video}")
    if mode == "compact":
        assert "does not fit the plan's chunks (a short last chunk?)" in _rep(compiled).compact


@pytest.mark.parametrize("mode", MODES)
def test_two_models_of_one_class_compiled_with_equal_options_each_run_their_own_session(mode):
    # dynamo keeps one set of graphs per code object: the second model runs the first one's graphs, whose ops carry
    # the first one's session id; its calls must still use run-time state of its own
    cfg = WINDOWED
    first, second = build(cfg, seed=0), build(cfg, seed=1)
    inputs = make_inputs(cfg, chunks=4)
    compiled = [_compiled(model, mode) for model in (first, second)]
    outputs = [rollout(c, cfg, inputs) for c in compiled]
    torch._dynamo.reset()
    alone = rollout(_compiled(second, mode), cfg, inputs)
    assert max_abs_error(outputs[1], alone) == 0.0
    sessions = [fkv_compile.report(c, print_table=False) for c in compiled]
    assert [r.layers[0].calls for r in sessions] == [4 * 5] * 2  # each its own 4 chunks x 5 calls at layer 0


def test_two_models_compiled_without_options_do_not_share_a_session():
    cfg = WINDOWED
    compiled = [torch.compile(build(cfg, seed=seed), backend="forcing_kv") for seed in (0, 1)]
    inputs = make_inputs(cfg, chunks=2)
    for c in compiled:
        rollout(c, cfg, inputs)
    reports = [fkv_compile.report(c, print_table=False) for c in compiled]
    assert all(r.layers[0].calls == 2 * 5 for r in reports), [r.layers for r in reports]


def test_a_plan_file_is_read_once_at_the_first_compile(tmp_path):
    # the README's flow saves a plan and compiles from the file; the file may change or go while the model runs
    path = tmp_path / "plan.json"
    mixed_plan(WINDOWED).save(str(path))
    model, inputs = setup(WINDOWED, torch.float32)
    compiled = torch.compile(model, backend="forcing_kv", options={"plan": str(path), "mode": "select",
                                                                    "lowering": "aot_eager"})
    rollout(compiled, WINDOWED, inputs)
    path.unlink()
    graphs = _rep(compiled).graphs
    rollout(compiled, WINDOWED, make_inputs(WINDOWED, batch=2, chunks=2))  # a new batch size: recompiles
    assert _rep(compiled).graphs > graphs


def test_models_of_one_class_share_dynamos_recompile_limit_and_the_one_that_reaches_it_is_told():
    # three models of one class with different options each compile their own variants of the same code objects;
    # dynamo's recompile limit (8) counts them together: the third model reaches it, and strict raises
    cfg = WINDOWED
    inputs = make_inputs(cfg, chunks=3)

    def run(i, mode, **options):
        compiled = torch.compile(build(cfg, seed=i), backend="forcing_kv", options={
            "plan": mixed_plan(cfg, retention=0.5 + 0.1 * i), "mode": mode, "lowering": "aot_eager", **options})
        return rollout(compiled, cfg, inputs)

    run(0, "select")
    run(1, "oracle")
    with pytest.warns(fkv_compile.RecompileLimitWarning, match="for other compiled models of the same code"):
        run(2, "select")
    # a fourth model compiles its other frames, but not that one: it is told at its first compile, and strict raises
    with pytest.warns(fkv_compile.RecompileLimitWarning, match="through other compiled models of the same code"):
        run(3, "oracle")
    with pytest.raises(Exception, match="strict: .*through other compiled models of the same code"):
        run(4, "oracle", strict=True)
    torch._dynamo.reset()
    run(0, "select")
    run(1, "oracle")
    with pytest.raises(Exception, match="strict: .*for other compiled models of the same code"):
        run(2, "select", strict=True)


@torch._dynamo.config.patch(recompile_limit=3)
def test_compact_past_the_recompile_limit_never_releases_what_the_eager_variants_read():
    # dynamic=False specializes every chunk position: past the limit the frames run eagerly on the dense buffers
    model, inputs = setup(WINDOWED, torch.float32)
    compiled = torch.compile(model, backend="forcing_kv", dynamic=False,
                             options={"plan": mixed_plan(WINDOWED), "mode": "compact", "lowering": "aot_eager"})
    with pytest.warns(fkv_compile.RecompileLimitWarning):
        for _ in range(2):
            caches = new_caches(WINDOWED, batch=1, dtype=torch.float32)
            rollout(compiled, WINDOWED, inputs, caches=caches)
    assert not any(fkv_compile.is_released(c["k"]) for c in caches[0])
    assert "no buffer is released from now on" in _rep(compiled).compact


def test_a_plan_whose_chunk_is_shorter_than_the_models_is_a_warning_and_with_strict_an_error():
    cfg = WINDOWED
    half = mixed_plan(MiniConfig(num_layers=2, window_frames=12, sink_frames=3, latent_height=4))  # half the frame
    assert half.frame_tokens * 2 == cfg.frame_tokens
    model, inputs = setup(cfg, torch.float32)
    inputs.noise = inputs.noise[:2]
    compiled = torch.compile(model, backend="forcing_kv", options={"plan": half, "mode": "select", "lowering": "aot_eager"})
    with pytest.warns(fkv_compile.PlanNeverAppliesWarning, match="the keep rule never applies"):
        rollout(compiled, cfg, inputs)
    torch._dynamo.reset()
    strict = torch.compile(model, backend="forcing_kv",
                           options={"plan": half, "mode": "select", "lowering": "aot_eager", "strict": True})
    with pytest.raises(Exception, match="strict: plan does not match the model: .* the keep rule never applies"):
        rollout(strict, cfg, inputs)


@pytest.mark.parametrize("mode", MODES)
def test_caches_made_under_inference_mode_are_kept_and_select_chooses_every_call(mode):
    # Krea's server generates under torch.inference_mode(): its caches carry no version counters, so nothing proves
    # a history unchanged; select chooses at every call, compact keeps the buffers and runs select, and says why
    model, _ = setup(RECOMPUTE, torch.float32)
    inputs = make_inputs(RECOMPUTE, chunks=4)
    reference, budget = oracle_reference(model, RECOMPUTE, inputs, mixed_plan(RECOMPUTE), run=recompute_rollout)
    compiled = _compiled(model, mode)
    with torch.inference_mode():
        out = recompute_rollout(compiled, RECOMPUTE, inputs)
    assert_within_budget(out, reference, budget, f"{mode} under inference_mode")
    rep = _rep(compiled)
    assert rep.selections[1] == 0, rep.selections  # never reused
    if mode == "compact":
        assert "no version counters (torch.inference_mode" in rep.compact


def test_release_trust_releases_at_the_first_call_and_a_bad_value_is_named():
    model, inputs = setup(WINDOWED, torch.float32)
    plan = mixed_plan(WINDOWED)
    reference, budget = oracle_reference(model, WINDOWED, inputs, plan)
    compiled = _compiled(model, "compact", release="trust")
    caches = new_caches(WINDOWED, batch=1, dtype=torch.float32)
    assert_within_budget(rollout(compiled, WINDOWED, inputs, caches=caches), reference, budget, "release=trust")
    assert all(fkv_compile.is_released(c["k"]) for c in caches[0])
    with pytest.raises(fkv_compile.OptionsError, match="option release expected one of \\('watch', 'trust'\\)"):
        fkv_compile.Config.from_options({"release": "never"})


def test_a_pipeline_that_reads_its_cache_outside_the_model():
    # a pipeline that copies part of its cache out after every chunk (as for a recache): select is exact in both
    # videos; compact is exact while it watches the first video, and once it released the buffers a read fails
    # loudly (reads change no version counter, so they cannot be watched: docs/design.md)
    model, inputs = setup(WINDOWED, torch.float32)
    plan = mixed_plan(WINDOWED)
    reference, budget = oracle_reference(model, WINDOWED, inputs, plan)
    for mode in MODES:
        torch._dynamo.reset()
        compiled = _compiled(model, mode)
        for video in range(2):
            kv, cross = caches = new_caches(WINDOWED, batch=1, dtype=torch.float32)
            copies = []

            def read(chunk: int) -> None:
                copies.append(kv[0]["k"][:, : WINDOWED.frame_tokens].clone())

            if mode == "compact" and video == 1:
                with pytest.raises(RuntimeError, match="out of bounds"):
                    rollout(compiled, WINDOWED, inputs, caches=caches, on_chunk=read)
            else:
                out = rollout(compiled, WINDOWED, inputs, caches=caches, on_chunk=read)
                assert_within_budget(out, reference, budget, f"{mode} video {video}")
                assert copies[-1].abs().sum() > 0
