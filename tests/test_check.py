"""Equivalence checking for users' CI: ``fkv check`` and ``fkv_compile.tools.testing.assert_equivalent``."""

import dataclasses
import json
import re
import textwrap

import pytest
import torch
from rollouts import mixed_plan
from test_cli import fkv

from fkv_compile import HeadPlan, PlanError, RecompileLimitWarning
from fkv_compile.models import MiniConfig, build, make_inputs, rollout
from fkv_compile.tools.check import CONCLUSIVE, check_equivalence
from fkv_compile.models import MINIATURES
from fkv_compile.tools.cli.targets import bundled_check_target
from fkv_compile.tools.testing import assert_equivalent

WINDOWED = MINIATURES["mini-windowed"].config  # what `fkv check mini-windowed` runs


def test_fkv_check_passes_on_the_bundled_miniature(tmp_path):
    plan = tmp_path / "plan.json"
    mixed_plan(WINDOWED).save(plan)
    out = json.loads(fkv("check", "mini-windowed", "--plan", plan, "--lowering", "aot_eager", "--chunks", 3,
                         "--json").stdout)
    assert out["passed"] and out["chunks"] == 6  # one output per chunk, two videos of 3
    checks = {c["mode"]: c for c in out["checks"]}
    assert set(checks) == {"aot_eager", "off", "oracle", "select", "compact"}  # the plain run: reproducibility
    assert checks["off"]["max_abs_error"] == 0.0 and checks["off"]["budget"] == 0.0
    assert checks["oracle"]["max_abs_error"] > 0 and checks["oracle"]["budget"] is None  # compression: information
    assert 0 < checks["select"]["budget"] < checks["oracle"]["max_abs_error"]
    assert set(out["effects"]) == {"compression", "one recent frame off", "one segment fewer"}
    assert min(out["effects"].values()) >= CONCLUSIVE * checks["select"]["budget"]
    assert checks["select"]["effect"] == min(out["effects"].values())  # the smallest effect is the one that counts
    assert all(c["cache_sites"] > 0 and c["graphs"] > 0 for c in out["checks"] if c["mode"] != "aot_eager")


def test_fkv_check_fails_clearly_on_a_plan_for_another_model_before_anything_runs(tmp_path):
    plan = tmp_path / "plan.json"
    HeadPlan.from_roles([["static", "dynamic", "dense"]] * 2, frame_tokens=WINDOWED.frame_tokens,
                        chunk_frames=3).save(plan)  # two layers of three heads; the miniature has 4 x 4
    result = fkv("check", "mini-windowed", "--plan", plan, "--lowering", "aot_eager", "--chunks", 2, ok=False)
    assert result.returncode == 1 and "rollout" not in result.stderr  # said before the first rollout
    (line,) = result.stderr.strip().splitlines()
    assert "does not fit mini-windowed" in line and "num_heads: plan has 3, model has 4" in line
    assert "fkv profile --model mini-windowed" in line and "torch.distributed" not in line


def test_a_user_target_with_a_misfit_plan_fails_at_the_first_rollout_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "user_target.py").write_text(
        "from fkv_compile.tools.cli.targets import bundled_check_target\n"
        "def target():\n"
        "    t = bundled_check_target('mini-windowed', 2)\n"
        "    return t.model_factory, t.rollout\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plan = tmp_path / "plan.json"
    HeadPlan.from_roles([["static", "dynamic"]] * 4, frame_tokens=WINDOWED.frame_tokens, chunk_frames=3).save(plan)
    result = fkv("check", "user_target:target", "--plan", plan, "--lowering", "aot_eager", ok=False)
    assert result.returncode == 1
    progress = [line for line in result.stderr.splitlines() if line.startswith("fkv check [")]
    assert len(progress) == 1 and "oracle" in progress[0]  # the first rollout, and no other
    errors = [line for line in result.stderr.splitlines() if line.startswith("fkv: error:")]
    assert len(errors) == 1 and "num_heads: plan has 2" in errors[0] and "fkv profile" in errors[0]


DIVERGING = '''
import torch
from fkv_compile.models import build, make_inputs, rollout
from fkv_compile.models import MINIATURES

CFG = MINIATURES["mini-windowed"].config
INPUTS = make_inputs(CFG, chunks=2, seed=0)


def target():
    # a common mistake: unseeded weights, so every run builds a different model
    return (lambda: build(CFG, seed=int(torch.randint(0, 2**30, ())))), (lambda m: rollout(m, CFG, INPUTS))
'''


def test_fkv_check_fails_on_a_model_whose_outputs_diverge(tmp_path):
    (tmp_path / "diverging_target.py").write_text(textwrap.dedent(DIVERGING))
    plan = tmp_path / "plan.json"
    mixed_plan(WINDOWED).save(plan)
    import os

    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = fkv("check", "diverging_target:target", "--plan", plan, "--lowering", "aot_eager",
                 "--modes", "off", "select", ok=False, env=env)
    assert result.returncode == 1
    assert "not reproducible" in result.stderr and "off: max abs error" in result.stderr


def test_assert_equivalent_in_pytest_against_inductor():
    cfg = MiniConfig(num_layers=2)
    inputs = make_inputs(cfg, chunks=2, seed=0)
    report = assert_equivalent(lambda: build(cfg, seed=0), lambda m: rollout(m, cfg, inputs), mixed_plan(cfg),
                               modes=("off", "select"))
    assert report.passed and report.checks[1].mode == "off" and report.checks[1].max_abs_error == 0.0
    assert report.noise > 0  # Inductor's own numeric difference from eager is the budget's base


def test_assert_equivalent_raises_a_misfit_plans_error_at_once():
    cfg = MiniConfig(num_layers=2)
    inputs = make_inputs(cfg, chunks=2, seed=0)
    wrong = HeadPlan.from_roles([["static", "static"]] * 3, frame_tokens=cfg.frame_tokens, chunk_frames=3)
    with pytest.raises(PlanError, match="num_layers: plan has 3"):
        assert_equivalent(lambda: build(cfg, seed=0), lambda m: rollout(m, cfg, inputs), wrong,
                          modes=("select",), lowering="aot_eager")


def test_a_frame_at_the_recompile_limit_fails_the_check_even_if_outputs_agree():
    # past the limit select and the oracle both run dense, so their outputs agree; the check must not pass
    cfg = MiniConfig(num_layers=2, window_frames=12, sink_frames=3, index_style="int")
    inputs = make_inputs(cfg, chunks=3, seed=0)
    with torch._dynamo.config.patch(recompile_limit=2), pytest.warns(RecompileLimitWarning):
        with pytest.raises(AssertionError, match=r"(?s)select: .*hit torch._dynamo.config.recompile_limit.*fkv check:"):
            assert_equivalent(lambda: build(cfg, seed=0), lambda m: rollout(m, cfg, inputs), mixed_plan(cfg),
                              modes=("select",), lowering="aot_eager")


def test_fkv_bench_runs_end_to_end_and_writes_its_files(tmp_path):
    out = json.loads(fkv("bench", "--geometry", "mini-windowed", "--layers", 1, "--heads", 2, "--head-dim", 16,
                         "--repeats", 2, "--lowering", "aot_eager", "--out", tmp_path, "--json").stdout)["mini-windowed"]
    assert out["settings"]["lowering"] == "aot_eager"
    assert set(out["rollout"]) == {"dense", "select", "compact"}
    for r in out["rollout"].values():
        assert len(r["chunk_s"]) == 6 and all(t > 0 for t in r["chunk_s"])
        assert 0 < r["attention_share"] < 1 and r["graphs_after_warmup"] == 0
        shares = [o["share"] for o in r["top_ops"]]  # the per-op profile: most self time first
        assert len(shares) == 8 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1
    compact, dense = out["rollout"]["compact"], out["rollout"]["dense"]
    chosen, reused, _ = out["rollout"]["select"]["selections"]  # a chunk's later calls reuse its layer's ranges
    assert dense["selections"] is None and reused > chosen > 0
    assert compact["kv_bytes"] < dense["kv_bytes"] == dense["dense_kv_bytes"]
    assert set(out["ratios_vs_dense"]) == {"select", "compact"} and 0 < out["kept_fraction"] < 1
    assert [set(times) for times in out["rounds"]] == [{"dense", "select", "compact"}] * 2
    assert out["compact_vs_select"] == pytest.approx(sum(t["compact"] / t["select"] for t in out["rounds"]) / 2)
    for mode, ratio in out["ratios_vs_dense"].items():  # each round's videos side by side, the median over rounds
        assert ratio["video_time_by_round"] == [times[mode] / times["dense"] for times in out["rounds"]]
        assert ratio["video_time"] == pytest.approx(sum(ratio["video_time_by_round"]) / 2)
        # the limit: dense time with attention shrunk to the kept tokens
        limit = 1 - dense["attention_share"] * (1 - out["kept_fraction"])
        assert ratio["amdahl_limit"] == pytest.approx(limit)
        assert ratio["saving_realised"] == pytest.approx((1 - ratio["video_time"]) / (1 - limit))
        mode = out["rollout"][mode]  # the same within the profiled attention time alone
        assert ratio["attention_time"] == pytest.approx(mode["attention_s"] / dense["attention_s"])
        assert ratio["attention_saving_realised"] == pytest.approx((1 - ratio["attention_time"])
                                                                   / (1 - out["kept_fraction"]))
    call = out["call"][0]
    assert call["kept_ratio"] < 1 and all(call[f"{name}_ms"] > 0 for name in ("select", "select_reused", "compact",
                                                                            "pregathered", "flex"))
    assert all(call[f"{name}_share_of_limit"] > 0 for name in ("select", "select_reused", "compact"))
    assert (tmp_path / "bench_mini-windowed.csv").read_text().count("\n") == 1 + 3 * 6
    assert (tmp_path / "bench_mini-windowed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out["files"] == [str(tmp_path / f"bench_mini-windowed.{suffix}") for suffix in ("json", "csv", "png")]


@pytest.mark.parametrize(("share", "possible", "words"), [
    (0.5, 0.4, "50% of the video's possible 40% saving realised"),
    (-12.46, 0.002, "within timing noise"),  # a tiny geometry: attention is a sliver of the time
    (-0.3, 0.2, "slower than dense: per-call costs outweigh"),
])
def test_bench_says_what_a_share_of_the_saving_means_at_every_size(share, possible, words):
    from fkv_compile.tools.bench import saving_in_words

    text = saving_in_words(share, possible, "the video's")
    assert words in text and not re.search(r"-\d", text)  # no negative share of a saving


def test_interleaved_times_rotate_the_order_from_round_to_round():
    from fkv_compile.tools.bench import interleaved_times, paired_ratio

    calls = []
    times = interleaved_times({name: (lambda name=name: calls.append(name)) for name in "abc"}, repeats=3, warmup=1)
    assert calls == list("abc" "abc" "bca" "cab") and all(len(t) == 3 for t in times.values())
    assert paired_ratio({"a": [1.0, 4.0, 9.0], "b": [2.0, 2.0, 3.0]}, "a", "b") == 2.0


def test_a_bench_rollout_that_fails_names_its_mode_and_the_error():
    from fkv_compile.tools.bench import BenchSettings, alternating_rollouts

    settings = BenchSettings(geometry="mini-windowed", side=1, layers=1, heads=2, head_dim=16, plan="no-such-plan.json")
    with pytest.raises(RuntimeError, match=r"(?s)the select rollout failed.*no-such-plan.json"):
        alternating_rollouts(settings, ("select",))
    with pytest.raises(ValueError, match=r"unknown bench mode 'slow'"):
        alternating_rollouts(settings, ("dense", "slow"))
    # compiling side by side (a GPU run's default): the first to fail is named, the other process is closed
    with pytest.raises(RuntimeError, match=r"(?s)the select rollout failed.*no-such-plan.json"):
        alternating_rollouts(settings, ("select", "dense"), concurrent_compile=True)


def test_a_bench_keeps_its_call_level_when_the_rollouts_fail_and_checks_its_modes_first(tmp_path):
    from fkv_compile.tools.bench import BenchSettings, run_bench

    settings = BenchSettings(geometry="mini-windowed", side=1, layers=1, heads=2, head_dim=16, repeats=1)
    with pytest.raises(ValueError, match=r"unknown bench mode 'slow'"):
        run_bench(settings, tmp_path / "none", modes=("dense", "slow"))
    assert not (tmp_path / "none").exists()  # bad input changes nothing
    with pytest.raises(RuntimeError, match=r"(?s)the dense rollout failed.*no-such-backend"):
        run_bench(dataclasses.replace(settings, lowering="no-such-backend"), tmp_path, modes=("dense",))
    partial = json.loads((tmp_path / "bench_mini-windowed.json").read_text())  # what a run stopped by its time limit leaves
    assert "rollout" not in partial and partial["call"][0]["select_share_of_limit"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs")
def test_the_gpu_script_says_what_it_needs_without_a_gpu():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr and not done.stdout


def test_the_kept_fraction_counts_every_chunk_window():
    from fkv_compile.tools.bench import kept_fraction

    static = HeadPlan.from_roles([["static"] * 2], frame_tokens=4, chunk_frames=3)
    # windows of 3, 6, 9 and then 12 frames for 7 more chunks; a static head keeps at most 1 + 1 + 3 frames
    assert kept_fraction(static, 12, 10) == pytest.approx((3 + 5 + 5 + 7 * 5) / (3 + 6 + 9 + 7 * 12))
    assert kept_fraction(HeadPlan.from_roles([["dense"]], frame_tokens=4, chunk_frames=3), None, 5) == 1.0


# -- the check can fail: a dense or wrong result, in every dtype ---------------------------------------------------

def _dense_select(q, k, v, plan, layer, scale=None, *args):
    from fkv_compile.modes.select import KeptTokens

    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    return out, KeptTokens(kept=torch.full((q.shape[1],), float(k.shape[2])), window=k.shape[2], layout_fits=True)


def _store_one_frame_more(monkeypatch):
    """compact keeps one recent frame more than the plan says (a kept set off by one frame)."""
    import dataclasses

    from fkv_compile.modes import state

    class OneFrameMore(state.LayerStore):
        def __init__(self, plan, layer, kernels, **options):
            more = {role: dataclasses.replace(p, recent_frames=p.recent_frames + 1)
                    for role, p in (("static", plan.static), ("dynamic", plan.dynamic))}
            super().__init__(dataclasses.replace(plan, **more), layer, kernels, **options)

    monkeypatch.setattr(state, "LayerStore", OneFrameMore)


# float32 is the easy case (bf16 is what once passed a dense select): kept as an extra
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, marks=pytest.mark.slow), torch.bfloat16], ids=str)
def test_the_check_fails_a_dense_select_and_a_compact_off_by_one_frame(dtype, monkeypatch):
    import fkv_compile.modes.calls

    target = bundled_check_target("mini-windowed", 3, dtype)
    twin = bundled_check_target("mini-windowed", 3) if dtype != torch.float32 else None
    monkeypatch.setattr(fkv_compile.modes.calls, "compressed_attention", _dense_select)
    _store_one_frame_more(monkeypatch)
    result = check_equivalence(target.model_factory, target.rollout, mixed_plan(WINDOWED), ("select", "compact"),
                               "aot_eager", reference=twin)
    failures = result.failures()
    assert [f.split(":")[0] for f in failures] == ["select", "compact"], result.table()
    assert all("exceeds the budget" in f for f in failures), failures
    assert result.compared_in == "float32"


def test_a_bf16_check_without_a_float32_twin_is_inconclusive_and_fails():
    target = bundled_check_target("mini-windowed", 2, torch.bfloat16)
    result = check_equivalence(target.model_factory, target.rollout, mixed_plan(WINDOWED), ("select",), "aot_eager")
    (failure,) = result.failures()
    assert failure.startswith("select: inconclusive in bfloat16") and "float32 twin" in failure




def test_fkv_bench_runs_the_miniature_profile_and_check_run_and_refuses_a_plan_for_another_model(tmp_path):
    from fkv_compile.tools.bench import GEOMETRIES, BenchSettings

    settings = BenchSettings(geometry="mini-windowed", layers=4, heads=4, head_dim=64)
    assert settings.config() == dataclasses.replace(WINDOWED, num_frames=3 * GEOMETRIES["mini-windowed"].chunks)
    plan = tmp_path / "plan.json"
    HeadPlan.from_roles([["static", "dynamic"]] * 4, frame_tokens=WINDOWED.frame_tokens, chunk_frames=3).save(plan)
    result = fkv("bench", "--geometry", "mini-windowed", "--plan", plan, "--out", tmp_path / "out", ok=False)
    assert result.returncode == 1 and not (tmp_path / "out" / "bench_mini-windowed.json").exists()
    (line,) = result.stderr.strip().splitlines()
    assert "4 layers x 2 heads" in line and "--heads 2" in line
