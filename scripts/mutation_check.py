"""Mutation check: the suite must catch realistic bugs. Each mutation is applied to a temporary copy of the
package, the tests that guard that code run against the copy (hypothesis derandomized: the same examples
every run), and a mutation the tests do not catch is a survivor. Exit status 1 when any survives.

    python scripts/mutation_check.py            # every mutation (about 10 minutes on 2 CPU cores)

It first runs the tests on an unmutated copy (a control: a copy that fails anyway would make every
mutation look caught).
    python scripts/mutation_check.py --list     # what is mutated, and which tests should catch it
    python scripts/mutation_check.py -k store   # the mutations whose name contains "store"
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # inside fkv_compile/
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids or files that should catch it


MUTATIONS = (
    Mutation("plan: k by Python's round() (banker's rounding)", "plan.py",
             "math.floor(self.candidate_frames * self.segments_per_frame * self.retention + 0.5)",
             "round(self.candidate_frames * self.segments_per_frame * self.retention)",
             ("tests/test_semantics.py",)),
    Mutation("plan: k floored", "plan.py",
             "math.floor(self.candidate_frames * self.segments_per_frame * self.retention + 0.5)",
             "math.floor(self.candidate_frames * self.segments_per_frame * self.retention)",
             ("tests/test_semantics.py",)),
    Mutation("semantics: recent frames one short", "semantics.py",
             "return range(max(p.sink_frames, self.history - p.recent_frames), self.history)",
             "return range(max(p.sink_frames, self.history - p.recent_frames + 1), self.history)",
             ("tests/test_semantics.py",)),
    Mutation("semantics: the k highest similarities kept", "semantics.py",
             "order = torch.sort(scores, dim=-1, stable=True).indices[..., :k]",
             "order = torch.sort(-scores, dim=-1, stable=True).indices[..., :k]",
             ("tests/test_semantics.py",)),
    Mutation("semantics: similarity against the frame itself", "semantics.py",
             "nxt = keys[:, :, (frame + 1) * f + start : (frame + 1) * f + end]",
             "nxt = keys[:, :, frame * f + start : frame * f + end]",
             ("tests/test_semantics.py",)),
    Mutation("ranges: select drops the recent frames", "modes/ranges.py",
             "starts[:, heads, 1] = min(layout.recent(p).start, layout.history) * f",
             "starts[:, heads, 1] = layout.history * f",
             ("tests/test_select.py",)),
    Mutation("ranges: selected segments one token short", "modes/ranges.py",
             "ends[:, heads, 2:] = (first + table.end[chosen]).expand(b, len(heads), -1)",
             "ends[:, heads, 2:] = (first + table.end[chosen] - 1).expand(b, len(heads), -1)",
             ("tests/test_select.py",)),
    Mutation("ranges: every head attends densely (a no-op select)", "modes/ranges.py",
             "        if role == DENSE:\n            ends[:, heads, 0] = lk",
             "        if True:\n            ends[:, heads, 0] = lk",
             ("tests/test_backend.py::test_select_keeps_the_right_tokens_in_low_precision_call_by_call[windowed-sink-bfloat16]",)),
    Mutation("torch ops: the padding mask of ragged segments ignored", "modes/torch_ops.py",
             "mask = None if len(set(per_item)) == 1 else valid[:, :, None, :]",
             "mask = None",
             ("tests/test_select.py",)),
    Mutation("torch ops: similarity of a frame with itself", "modes/torch_ops.py",
             'torch.einsum("...e,...e->...", x[:, :-1], x[:, 1:])',
             'torch.einsum("...e,...e->...", x[:, :-1], x[:, :-1])',
             ("tests/test_select.py",)),
    Mutation("store: no reset when a new video starts", "modes/store.py",
             "            self.reset()  # the pipeline went back to the start of the cache: a new video",
             "            pass  # the pipeline went back to the start of the cache: a new video",
             ("tests/test_store.py::test_store_keeps_what_the_rule_keeps_on_the_dense_window[torch]",
              "tests/test_compact.py::test_two_different_videos_with_dense_static_and_dynamic_heads_in_every_layer")),
    Mutation("store: the commit drops the sink", "modes/store.py",
             "fixed = _frame_index(old, sink + [first + j for j in layout.recent(p)], f)",
             "fixed = _frame_index(old, [first + j for j in layout.recent(p)], f)",
             ("tests/test_store.py",)),
    Mutation("store: the commit keeps one recent frame fewer", "modes/store.py",
             "fixed = _frame_index(old, sink + [first + j for j in layout.recent(p)], f)",
             "fixed = _frame_index(old, sink + [first + j for j in layout.recent(p)[1:]], f)",
             ("tests/test_compact.py::test_compact_keeps_the_right_tokens_in_low_precision_call_by_call[windowed-sink-bfloat16]",)),
    Mutation("store: a roll moves one token fewer", "modes/calls.py",
             "        entry.store.roll(dst, src, length)",
             "        entry.store.roll(dst, src, length - 1)",
             ("tests/test_compact.py::test_memory_is_constant_over_a_long_rollout_and_within_budget",)),
    Mutation("state: every layer bound to layer 0", "modes/state.py",
             "            self._bindings[ident] = layer\n",
             "            self._bindings[ident] = 0\n",
             ("tests/test_ops.py",)),
    Mutation("ops: the backward ignores the kept set", "ops.py",
             "if masked else None", "if False else None",
             ("tests/test_autograd.py",)),
    Mutation("grad: the softmax backward without its row term", "modes/grad.py",
             "ds = p * (g32 @ v32.transpose(-1, -2) - (g32 * out).sum(-1, keepdim=True))",
             "ds = p * (g32 @ v32.transpose(-1, -2))",
             ("tests/test_autograd.py",)),
    Mutation("calibration: chunks told apart by the window length only", "modes/calibration.py",
             "return k.shape[2], float(last.double().sum())",
             "return k.shape[2], 0.0",
             ("tests/test_calibration.py::test_a_chunk_count_ends_calibration_within_the_video",)),
    Mutation("calibration: a new video not noticed", "modes/calibration.py",
             "new_video = history == 0 and self._had_history",
             "new_video = False",
             ("tests/test_calibration.py::test_no_options_first_video_is_dense_then_the_calibrated_plan_matches_its_oracle"
              "[windowed-sink]",)),
    Mutation("ops: compact adopts nothing at a mid-video switch", "modes/calls.py",
             "    if store.chunk is None and write[0] > window[0] and cache_k.untyped_storage().nbytes():",
             "    if False:",
             ("tests/test_calibration.py::test_a_chunk_count_ends_calibration_within_the_video",)),
    Mutation("ops: a grown cache's window is only its new chunk", "modes/calls.py",
             "                (0, end), scale)",
             "                (start, end), scale)",
             ("tests/test_patterns.py::test_compact_owns_a_cat_grown_cache_and_releases_the_grown_tensors[sdpa]",)),
    Mutation("LongLive: a write-back that differs from the staged clone's write is trusted", "modes/guard.py",
             "if expected != step or not untouched:", "if not untouched:",
             ("tests/test_longlive.py::test_watched_staged_buffers_are_released_from_the_second_video_and_a_foreign_"
              "write_back_leaves_the_layer_dense",)),
    Mutation("LongLive: the write-back of a staged cache is not made while its buffers are kept", "modes/guard.py",
             "        if entry.keeps_dense():\n            make()\n        entry.mark = entry.mark.advanced",
             "        entry.mark = entry.mark.advanced",
             ("tests/test_longlive.py::test_watched_staged_buffers_are_released_from_the_second_video_and_a_foreign_"
              "write_back_leaves_the_layer_dense",)),
    Mutation("LongLive: the store keeps no KV-recache reserve of the protected sink", "modes/store.py",
             "if not self.keep_protected or self.chunk[0] >= self.protected:", "if True:",
             ("tests/test_longlive.py::test_compact_serves_longlive_through_two_prompt_switches_from_the_store",)),
    Mutation("LongLive: a recomputed chunk inside the sink does not rewind the store", "modes/store.py",
             "0 < start and (start < self.chunk[0] or start == end) and not self.rolled",
             "0 < start < self.chunk[0] and not self.rolled",
             ("tests/test_longlive.py::test_compact_on_longlive_keeps_the_right_tokens_call_by_call_through_two_recaches",)),
    Mutation("store: a chunk's later step written over the wrong heads", "modes/store.py",
             "torch.index_select(k_heads, 1, heads, out=self.held.k[:, :, -n:])",
             "torch.index_select(k_heads, 1, heads.flip(0), out=self.held.k[:, :, -n:])",
             ("tests/test_store.py::test_store_keeps_what_the_rule_keeps_on_the_dense_window[torch]",)),
    Mutation("store: the ranges attention reads kept across a roll or a new chunk", "modes/store.py",
             "if self._runs is None or self._runs[0] != window or self._runs[1] is not held.pos:",
             "if self._runs is None or self._runs[0] != window:",
             ("tests/test_store.py::test_attention_follows_every_commit_at_a_full_rolling_window",)),
    Mutation("passes: an explicit attn_mask ignored by the matcher", "passes/attention.py",
             "    if mask is not None:\n        return None, Declined(node, \"attention has an explicit attn_mask\"",
             "    if False:\n        return None, Declined(node, \"attention has an explicit attn_mask\"",
             ("tests/test_backend.py::test_unsupported_attention_is_left_alone_and_reported_or_raises_in_strict_mode",)),
    Mutation("passes: the plan's head count not checked", "passes/fit.py",
             "    if isinstance(heads, int) and heads != session.plan.num_heads:",
             "    if False:",
             ("tests/test_backend.py::test_plan_for_another_model_is_rejected_naming_the_mismatch",)),
    Mutation("kernels: no softmax rescale of the accumulator", "kernels/attention.py",
             "acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)",
             "acc = acc + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)",
             ("tests/test_kernels.py::test_range_attention_matches_the_float64_oracle",)),
    Mutation("kernels: similarity against the frame itself", "kernels/similarity.py",
             "c = tl.load(ptrs + F * s_kl, mask=ok, other=0.0).to(tl.float32)",
             "c = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)",
             ("tests/test_kernels.py::test_segment_similarity_matches_the_keep_rule",)),
    Mutation("torch ops: gathered rows one step too wide", "modes/torch_ops.py",
             "step = math.gcd(*x.stride()[:3]) or 1", "step = x.shape[-1]",
             ("tests/test_select.py::test_torch_range_attention_matches_the_float64_oracle_in_any_layout",)),
    Mutation("select: a chunk's ranges reused at another write position", "modes/select.py",
             "if history is not None and last is not None and last[0] == history:",
             "if history is not None and last is not None and last[0][2:] == history[2:]:",
             ("tests/test_select.py::test_a_layer_reuses_its_ranges_only_for_the_same_history",)),
    Mutation("select: the dense shortcut taken one frame too late into a video", "semantics.py",
             "return self.history <= p.sink_frames + p.recent_frames",
             "return self.history <= p.sink_frames + p.recent_frames + 1",
             ("tests/test_semantics.py::test_keep_rule_invariants",
              "tests/test_select.py::test_select_matches_float64_oracle")),
    Mutation("select: ranges reused after a call that could not tell its history", "modes/select.py",
             "            self.forget(layer)\n        else:", "            pass\n        else:",
             ("tests/test_select.py::test_a_layer_reuses_its_ranges_only_for_the_same_history",)),
    Mutation("select: ranges reused although the choice reads the current chunk", "modes/select.py",
             "reusable = history is not None and layout.chosen_from_history(plan.dynamic)",
             "reusable = history is not None",
             ("tests/test_backend.py::test_select_chooses_once_per_chunk_and_again_after_a_roll_a_recache_and_a_new_video",)),
    Mutation("select: ranges reused across a roll", "passes/pipeline.py",
             "if isinstance(accesses, CacheAccesses) and not accesses.rolls and accesses.staged is None:",
             "if isinstance(accesses, CacheAccesses) and accesses.staged is None:",
             ("tests/test_backend.py::test_select_chooses_once_per_chunk_and_again_after_a_roll_a_recache_and_a_new_video",)),
    Mutation("watch: version counters ignored (buffers written elsewhere look untouched)", "modes/watch.py",
             "return Touch.SAME if now == self.versions else Touch.TOUCHED", "return Touch.SAME",
             ("tests/test_guard.py::test_a_cache_rebuilt_from_position_0_at_every_block_matches_the_oracle[select]",)),
    Mutation("select: a layer's ranges kept although its buffers were written elsewhere", "modes/select.py",
             "if mark is None or mark.compare(cache_k, cache_v) is not Touch.SAME:", "if mark is None:",
             ("tests/test_guard.py::test_a_cache_rebuilt_from_position_0_at_every_block_matches_the_oracle[select]",)),
    Mutation("compact: one store for every buffer pair of a layer", "modes/guard.py",
             "entry = next((e for e in entries if e.mark.describes(cache_k, cache_v)), None)",
             "entry = entries[-1] if entries else None",
             ("tests/test_guard.py::test_one_compiled_model_serves_two_videos_in_turns[compact]",)),
    Mutation("compact: buffers released without watching a video first", "modes/guard.py",
             "                and (layer in self.proven or self.trust) and not self.held):",
             "                and not self.held):",
             ("tests/test_guard.py::test_a_pipeline_that_reuses_its_buffers_zeroed_or_not_between_videos[compact]",)),
    Mutation("compact: a short chunk served by the store", "modes/calls.py",
             "if entry.store is not None and not fits_plan(s, q, window):", "if False:",
             ("tests/test_guard.py::test_a_short_last_chunk_is_served_dense_as_the_keep_rule_says[compact]",)),
    Mutation("compact: watched buffers not written by the ops", "modes/calls.py",
             "        if entry.keeps_dense():  # watched", "        if False:  # watched",
             ("tests/test_guard.py::test_a_short_last_chunk_is_served_dense_as_the_keep_rule_says[compact]",)),
    Mutation("state: a compiled module runs in the session its reused graph was compiled in", "modes/state.py",
             "        if caller is not None:\n", "        if False:\n",
             ("tests/test_guard.py::test_two_models_of_one_class_compiled_with_equal_options_each_run_their_own_session",)),
    Mutation("state: a plan file read again at every compile", "modes/state.py",
             "if dict(options or {}) != existing.given and config_of(options) != existing.config:",
             "if config_of(options) != existing.config:",
             ("tests/test_guard.py::test_a_plan_file_is_read_once_at_the_first_compile",)),
    Mutation("passes: compiles counted per session, not per code object", "passes/limits.py",
             "variants = max(record.compiles, ident.variants)", "variants = record.compiles",
             ("tests/test_guard.py::test_models_of_one_class_share_dynamos_recompile_limit_and_the_one_that_reaches_it_is_told",)),
    Mutation("passes: a frame another model brought to the recompile limit is not told", "passes/limits.py",
             "        elif code.co_filename == file and", "        elif False and code.co_filename == file and",
             ("tests/test_guard.py::test_models_of_one_class_share_dynamos_recompile_limit_and_the_one_that_reaches_it_is_told",)),
    Mutation("compact: buffers released past the recompile limit", "modes/guard.py",
             "and (layer in self.proven or self.trust) and not self.held):",
             "and (layer in self.proven or self.trust)):",
             ("tests/test_guard.py::test_compact_past_the_recompile_limit_never_releases_what_the_eager_variants_read",)),
    Mutation("passes: a plan whose chunk never fits passes silently", "passes/fit.py",
             "if isinstance(queries, int) and queries > chunk:", "if False:",
             ("tests/test_guard.py::test_a_plan_whose_chunk_is_shorter_than_the_models_is_a_warning_and_with_strict_an_error",)),
    Mutation("ops: the backward's fake keeps q's strides (Inductor asserts them against the real op's)", "ops.py",
             "    return _grads_like(q, k, v)\n", "    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)\n",
             ("tests/test_autograd.py::test_a_training_step_through_the_pass_equals_the_float64_oracle[select-inductor]",)),
    Mutation("attention: a window sliced from a staged clone of the cache not seen (LongLive 2.0 left dense)",
             "passes/windows.py", "        if is_clone(base):  # a copy", "        if False:  # a copy",
             ("tests/test_longlive.py::test_longlive2_write_back_in_the_attention_graph_is_replayed_after_the_store",)),
    Mutation("replay: a write-back in the staged attention's own graph left as traced", "passes/replay.py",
             "steps = _steps(buffer, staged.get(buffer))", "steps = _steps(buffer, None)",
             ("tests/test_longlive.py::test_longlive2_write_back_in_the_attention_graph_is_replayed_after_the_store",)),
    Mutation("compact: a staged cache written before its attention owned by the store", "passes/compact.py",
             "if any(not _before(site, step)", "if False and any(not _before(site, step)",
             ("tests/test_longlive.py::test_a_staged_cache_written_before_its_attention_falls_back_to_select_exactly",)),
    Mutation("frames: the Python ints a frame recompiled on not named", "passes/frames.py",
             "        if type(value) is int:\n", "        if False:\n",
             ("tests/test_longlive.py::test_longlive2_compiled_with_dynamic_false_and_with_the_ints_the_warning_names_"
              "marked_dynamic_compiles_once",)),
    Mutation("frames: an expression the model's code pins not named", "passes/frames.py",
             "        found[f\"{expr.lhs.xreplace(names)} ({where})\"] = int(expr.rhs)\n", "",
             ("tests/test_patterns.py::test_a_lookup_keyed_by_a_position_is_named_when_it_brings_a_frame_to_the_"
              "recompile_limit",)),
    Mutation("attention: Rolling Forcing's anchored window not recognised (its one-chunk calls left dense)",
             "passes/windows.py", "if isinstance(parts, (list, tuple)) and len(parts) == 3 and isinstance(dim, int):",
             "if False:",
             ("tests/test_patterns.py::test_an_anchored_window_is_compressed_when_the_query_is_one_chunk_and_exactly_"
              "dense_otherwise",)),
    Mutation("ops: the attention ops return their result's strides, not the contiguous layout the fake declares",
             "ops.py", "    return result.contiguous()\n", "    return result\n",
             ("tests/test_opcheck.py",)),
    Mutation("ops: the attention fake declares q's layout (a transposed view's strides)", "ops.py",
             "        return q.new_empty(shape)\n", "        return torch.empty_like(q)[..., :shape[-1]]\n",
             ("tests/test_opcheck.py",)),
    Mutation("tuning: the measured table ignored (autotune times configs that spill or cannot launch)",
             "kernels/tuning.py", "    if measured is None:\n", "    if True:\n", ("tests/test_gpu_static.py",)),
    Mutation("gpu_static: where every config spills, none kept (an fp32 launch on a GPU fails)", "tools/gpu_static.py",
             "winners = sorted(filter(_runs, group), key=lambda b: b.spill_bytes)[:LEAST_SPILLING]", "winners = []",
             ("tests/test_gpu_static.py",)),
    Mutation("gpu_static: the least spilling kept by the most spilling", "tools/gpu_static.py",
             "key=lambda b: b.spill_bytes)", "key=lambda b: -b.spill_bytes)", ("tests/test_gpu_static.py",)),
    Mutation("gpu_static: a build that spills taken as able to win", "tools/gpu_static.py",
             "    return b.ok and b.spill_bytes == 0 and", "    return b.ok and", ("tests/test_gpu_static.py",)),
    Mutation("roofline: K and V bytes counted once for both", "tools/roofline.py",
             "data = sum((2 * lq + 2 * t) * d * BYTES", "data = sum((2 * lq + t) * d * BYTES",
             ("tests/test_roofline.py",)),
    Mutation("roofline: ranges not rounded up to the kernel's key blocks", "tools/roofline.py",
             "math.ceil(r / block) * block for r in ranges", "r for r in ranges", ("tests/test_roofline.py",)),
    Mutation("contest: the slower contender wins", "modes/contest.py",
             "min(times, key=times.__getitem__)", "max(times, key=times.__getitem__)", ("tests/test_contest.py",)),
    Mutation("contest: persisted winners not read (every process races again)", "modes/contest.py",
             "                    self.winners.setdefault(key, value[\"contender\"])\n", "                    pass\n",
             ("tests/test_contest.py",)),
    Mutation("contest: the shape ignores the window's length", "modes/contest.py",
             "q.shape[-1], q.shape[2], k.shape[2], q.shape[1]", "q.shape[-1], q.shape[2], q.shape[1]",
             ("tests/test_contest.py",)),
    Mutation("order: a window written outside the graph trusted to be in written order", "passes/pipeline.py",
             "        checks_order=site.k_window.pattern in", "        checks_order=False and site.k_window.pattern in",
             ("tests/test_patterns.py::test_a_ring_buffer_is_compressed_while_written_in_order_and_exactly_dense_once_"
              "a_write_lands_inside",)),
    Mutation("order: blocks written out of turn before the query's tokens not seen (stamps ignored)", "modes/order.py",
             "    return suffix and all(a <= b for a, b in zip(stamps, stamps[1:]))", "    return suffix",
             ("tests/test_order.py",)),
    Mutation("order: a write inside the window trusted when the op made it", "modes/order.py",
             "        at_end = write[1] == window_end and write[0] >= window_end - query_tokens\n",
             "        at_end = True\n", ("tests/test_order.py",)),
    Mutation("order: one state per layer, whichever buffers (two streams in turns)", "modes/order.py",
             "        return layer, storage_id(k)\n", "        return layer, 0\n",
             ("tests/test_guard.py::test_one_compiled_model_serves_two_videos_in_turns",)),
    Mutation("order: writes from elsewhere between the op's own trusted (the op's write taken as the only one)",
             "modes/order.py", "        if seen is None or touched or seen.firsts is None:\n",
             "        if seen is None or seen.firsts is None:\n", ("tests/test_order.py",)),
    Mutation("order: content changes not compared (every block taken as unchanged)", "modes/order.py",
             "                changed[lo:hi] = (firsts[:, :, lo:hi] != before).any(-1).any(1).any(0)\n",
             "                changed[lo:hi] = False\n", ("tests/test_order.py",)),
    Mutation("attention: keys re-rotated outside the graph left dense", "passes/windows.py",
             "    if len(found) == 1 and misses[0].kind is Miss.WHOLE_INPUT:\n", "    if False:\n",
             ("tests/test_patterns.py::test_rolling_forcing_re_rotated_keys_are_compressed_per_call_and_compact_falls_"
              "back_to_select",)),
    Mutation("passes: compact tries to own keys recomputed at every call", "passes/pipeline.py",
             "    if recomputed:\n", "    if False:\n",
             ("tests/test_patterns.py::test_rolling_forcing_re_rotated_keys_are_compressed_per_call_and_compact_falls_"
              "back_to_select",)),
    Mutation("Ulysses: the layer selection's partial sums not all-reduced", "modes/sharding.py",
             "        dist.all_reduce(sums, group=self.group)\n",
             "",
             ("tests/test_ulysses.py::test_two_ranks_select_and_compact_equal_the_single_device_oracle",)),
    Mutation("Ulysses: every rank given the roles of the first heads", "modes/sharding.py",
             "return self.plan.head_slice(self.heads)",
             "return self.plan.head_slice(range(len(self.heads)))",
             ("tests/test_ulysses.py::test_two_ranks_select_and_compact_equal_the_single_device_oracle",)),
    Mutation("Ulysses: a rank without dynamic heads skips the all-reduce (a hang)", "modes/ranges.py",
             "if shard is not None and not dyn and available:",
             "if False:",
             ("tests/test_ulysses.py::test_two_ranks_select_and_compact_equal_the_single_device_oracle",)),
)


def _copy(into: Path) -> None:
    for name in ("fkv_compile", "tests", "docs"):  # docs: tests check tables generated into them
        shutil.copytree(ROOT / name, into / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", into / "pyproject.toml")


def _pytest(work: Path, tests: tuple[str, ...], timeout: float) -> tuple[bool, float, str]:
    """(passed, seconds, the tail of the output) of ``tests`` run against the copy in ``work``."""
    env = {**os.environ, "PYTHONPATH": str(work), "HYPOTHESIS_PROFILE": "mutation", "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.perf_counter() - start, "timed out"
    return done.returncode == 0, time.perf_counter() - start, (done.stdout + done.stderr)[-600:]


def control(mutations: list[Mutation], timeout: float) -> None:
    """The tests pass on an unmutated copy: else a 'caught' would mean nothing."""
    tests = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
    with tempfile.TemporaryDirectory(prefix="fkv-control-") as tmp:
        _copy(Path(tmp))
        passed, seconds, tail = _pytest(Path(tmp), tests, timeout)
    if not passed:
        raise SystemExit(f"the tests fail on an unmutated copy ({seconds:.0f} s); fix that first:\n{tail}")
    print(f"control: the tests pass on an unmutated copy ({seconds:.0f} s)", flush=True)


def run(mutation: Mutation, timeout: float) -> tuple[bool, float, str]:
    """(caught, seconds, the tail of pytest's output) for one mutation on a fresh copy."""
    with tempfile.TemporaryDirectory(prefix="fkv-mutant-") as tmp:
        work = Path(tmp)
        _copy(work)
        target = work / "fkv_compile" / mutation.path
        text = target.read_text()
        if text.count(mutation.old) != 1:
            raise SystemExit(f"{mutation.name}: the text to mutate occurs {text.count(mutation.old)} times in "
                             f"{mutation.path}; update the mutation")
        target.write_text(text.replace(mutation.old, mutation.new))
        passed, seconds, tail = _pytest(work, mutation.tests, timeout)
        return not passed, seconds, tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="only mutations whose name contains this")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if args.k in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name:<60} {m.path:<22} {' '.join(m.tests)}")
        return 0
    survivors, total = [], time.perf_counter()
    control(chosen, args.timeout)
    print(f"{'mutation':<60} {'result':<9} {'seconds':>7}  tests")
    for m in chosen:
        caught, seconds, tail = run(m, args.timeout)
        print(f"{m.name:<60} {'caught' if caught else 'SURVIVED':<9} {seconds:>7.1f}  {' '.join(m.tests)}", flush=True)
        if not caught:
            survivors.append((m, tail))
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutations caught in {time.perf_counter() - total:.0f} s")
    for m, tail in survivors:
        print(f"\nSURVIVED: {m.name} ({m.path}); should be caught by {' '.join(m.tests)}\n{tail}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
