"""The ``fkv`` command: its entry point in this process (as ``fkv`` runs it, less a Python start-up and torch's
import, about 4 s a call here), in a subprocess where a call needs its own directory or environment, and the
installed console script once."""

import dataclasses
import io
import json
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from fkv_compile import HeadPlan
from fkv_compile.tools.cli import main

REFERENCE = Path(__file__).resolve().parents[1] / "fkv_compile" / "plans" / "forcingkv_heads_selfforcing.json"


def fkv(*args, cwd=None, env=None, ok=True) -> subprocess.CompletedProcess:
    argv = [str(a) for a in args]
    if cwd is not None or env is not None:
        result = subprocess.run([sys.executable, "-m", "fkv_compile.tools.cli", *argv], capture_output=True, text=True,
                                timeout=600, cwd=cwd, env=env)
    else:
        torch._dynamo.reset()  # each command compiles as in a fresh process
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code
        result = subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_console_script_is_installed():
    result = subprocess.run(["fkv", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "profile" in result.stdout


def test_profile_show_validate_convert_round_trip(tmp_path):
    plan_path, png = tmp_path / "plan.json", tmp_path / "plan.png"
    out = json.loads(fkv("profile", "--model", "planted", "--out", plan_path, "--png", png, "--json").stdout)
    plan = HeadPlan.load(plan_path)
    planted = tuple(tuple("static" if (layer + h) % 3 == 0 else "dynamic" for h in range(4)) for layer in range(3))
    assert plan.roles == planted
    assert out["static_heads"] == 4 and out["stability"]["sample"]["min_agreement"] == 1.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    shown = json.loads(fkv("plan", "show", plan_path, "--window-frames", 15, "--json").stdout)
    assert [r["static"] for r in shown["layers"]] == [2, 1, 1]
    assert shown["totals"]["bytes_per_chunk"] < shown["totals"]["dense_bytes_per_chunk"]
    assert "kept/dense tokens" in fkv("plan", "show", plan_path, "--png", tmp_path / "show.png").stdout

    assert fkv("plan", "validate", plan_path, "--model", "planted").stdout.startswith("OK")
    wrong = fkv("plan", "validate", plan_path, "--model", "mini", ok=False)
    assert wrong.returncode == 1
    assert "num_layers: plan has 3, model has 4" in wrong.stderr and "frame_tokens: plan has 8, model has 24" in wrong.stderr
    assert json.loads(fkv("plan", "validate", plan_path, "--model", "mini", "--json", ok=False).stdout)["ok"] is False

    ref, back = tmp_path / "ref.json", tmp_path / "back.json"
    fkv("plan", "convert", plan_path, ref)
    assert json.loads(ref.read_text())["layers"][0]["static_head"] == [0, 3]
    fkv("plan", "convert", ref, back)
    assert HeadPlan.load(back) == plan


def test_plan_list_shows_the_bundled_plans_and_show_takes_a_name():
    listed = json.loads(fkv("plan", "list", "--json").stdout)["plans"]
    assert [p["name"] for p in listed] == ["self-forcing", "longlive", "causal-forcing", "raven", "krea-realtime-14b"]
    assert all(p["frame_tokens"] == 1560 and p["chunk_frames"] == 3 for p in listed)
    shown = json.loads(fkv("plan", "show", "longlive", "--window-frames", "12", "--json").stdout)
    assert len(shown["layers"]) == 30
    unknown = fkv("plan", "show", "long-live", ok=False)
    assert "unknown plan name 'long-live'; the bundled plans are" in unknown.stderr
    ranks = json.loads(fkv("plan", "show", "self-forcing", "--ranks", "4", "--json").stdout)
    assert [r["heads"] for r in ranks["ranks"]] == ["0-2", "3-5", "6-8", "9-11"]
    assert sum(r["static"] + r["dynamic"] for r in ranks["ranks"]) == 360 and 1.0 < ranks["imbalance"] < 1.1
    assert "12 heads do not split evenly over 5 ranks" in fkv("plan", "show", "self-forcing", "--ranks", "5", ok=False).stderr


def test_reference_plan_through_the_cli(tmp_path):
    ours = tmp_path / "sf.json"
    missing = fkv("plan", "convert", REFERENCE, ours, ok=False)
    assert missing.returncode == 1 and "--frame-tokens" in missing.stderr
    fkv("plan", "convert", REFERENCE, ours, "--frame-tokens", 1560, "--chunk-frames", 3)
    plan = HeadPlan.load(ours)
    assert plan.count("static") == 134
    baseline, ref, back = tmp_path / "baseline.json", tmp_path / "baseline_ref.json", tmp_path / "back.json"
    dataclasses.replace(plan, segment_choice="recent", selection="head").save(baseline)
    fkv("plan", "convert", baseline, ref)
    fkv("plan", "convert", ref, back)
    assert HeadPlan.load(back) == HeadPlan.load(baseline), "plan-wide fields survive the reference format"
    fkv("plan", "validate", ours, "--geometry", "num_layers=30,num_heads=12,frame_tokens=1560,chunk_frames=3,window_frames=21")
    bad = fkv("plan", "validate", ours, "--geometry", "num_layers=30,num_heads=24,frame_tokens=880,chunk_frames=8", ok=False)
    assert "num_heads: plan has 12, model has 24" in bad.stderr and "chunk_frames: plan has 3, model has 8" in bad.stderr
    shown = json.loads(fkv("plan", "show", ours, "--json").stdout)
    # Self Forcing 5 s: static heads attend 5 of 21 frames, dynamic 6 (one frame of segments)
    ratio = shown["totals"]["bytes_per_chunk"] / shown["totals"]["dense_bytes_per_chunk"]
    assert ratio == pytest.approx((134 * 5 + 226 * 6) / (360 * 21), rel=1e-3)


def test_profile_a_user_callable(tmp_path):
    (tmp_path / "user_model.py").write_text(textwrap.dedent(
        """
        import torch
        from fkv_compile.models.planted import PlantedAttentionStack, PlantedConfig, planted_rollout

        CFG = PlantedConfig(roles=(("static", "dynamic"), ("dynamic", "static")))
        MODEL = PlantedAttentionStack(CFG).eval()

        def run(compile_model, sample):
            planted_rollout(compile_model(MODEL), CFG, seed=sample)
        """
    ))
    import os

    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "user.json"
    fkv("profile", "--model", "user_model:run", "--out", out, "--layers", 2, "--heads", 2, "--frame-tokens", 8,
        "--chunk-frames", 3, "--quiet", env=env)
    assert HeadPlan.load(out).roles == (("static", "dynamic"), ("dynamic", "static"))
    no_geometry = fkv("profile", "--model", "user_model:run", "--out", out, env=env, ok=False)
    assert "needs --layers, --heads, --frame-tokens, --chunk-frames" in no_geometry.stderr
    wrong = fkv("profile", "--model", "user_model:nothing", "--out", out, "--layers", 2, "--heads", 2,
                "--frame-tokens", 8, "--chunk-frames", 3, env=env, ok=False)
    assert "cannot load it" in wrong.stderr


def test_profile_the_bundled_miniature(tmp_path):
    out = tmp_path / "mini.json"
    result = fkv("profile", "--model", "mini-windowed", "--chunks", 4, "--samples", 1, "--out", out,
                 "--force-layer", "0=static")
    plan = HeadPlan.load(out)
    assert (plan.num_layers, plan.num_heads) == (4, 4) and plan.roles[0] == ("static",) * 4
    assert "role stability" in result.stdout and "profiling [" in result.stderr


@pytest.mark.parametrize("case", ["binary plan", "list plan", "directory plan", "zero window", "negative window",
                                  "zero chunks", "missing out folder"])
def test_every_input_error_is_one_line_and_a_nonzero_exit(case, tmp_path):
    binary, listed = tmp_path / "plan.bin", tmp_path / "list.json"
    binary.write_bytes(bytes(range(256)))
    listed.write_text("[1, 2, 3]")
    argv = {
        "binary plan": ("plan", "show", binary),
        "list plan": ("plan", "show", listed),
        "directory plan": ("plan", "show", tmp_path),
        "zero window": ("plan", "show", REFERENCE, "--window-frames", "0"),
        "negative window": ("plan", "show", REFERENCE, "--window-frames", "-3"),
        "zero chunks": ("check", "mini-windowed", "--plan", REFERENCE, "--chunks", "0"),
        "missing out folder": ("plan", "convert", REFERENCE, tmp_path / "no" / "such" / "plan.json",
                               "--frame-tokens", "24", "--chunk-frames", "3"),
    }[case]
    result = fkv(*argv, ok=False)
    assert result.returncode != 0 and not result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_the_real_code_script_names_what_a_checkout_lacks(tmp_path):
    # the real-code runs need the pipelines' checkouts (docs/real_code.md); without one the script says what is missing
    script = Path(__file__).resolve().parents[1] / "scripts" / "real_code.py"
    result = subprocess.run([sys.executable, str(script), "--checkout", str(tmp_path), "--pipeline", "krea"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (f"real_code: {tmp_path} has no wan/modules/attention.py: not a "
                                                     "checkout of this pipeline's repository")


def test_every_option_of_every_verb_says_what_it_does():
    import argparse

    from fkv_compile.tools.cli import build_parser

    silent = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for verb, sub in action.choices.items():
                    walk(sub, f"{name} {verb}")
            elif not action.help and not isinstance(action, argparse._HelpAction):
                silent.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "fkv")
    assert not silent
    assert "this one builds the parser" not in build_parser().format_help()


@pytest.mark.parametrize("argv", [["profile", "--model", "mini", "--out", "p.json", "--png", "p.png"],
                                  ["bench", "--geometry", "mini-windowed"], ["plan", "show", "self-forcing", "--png", "p.png"]])
def test_a_missing_matplotlib_is_said_in_one_line_before_any_work(argv, monkeypatch, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else
                        find_spec(name, *a))
    monkeypatch.chdir(tmp_path)
    result = fkv(*argv, ok=False)
    assert result.returncode == 1 and not result.stdout and not list(tmp_path.iterdir())  # nothing done
    (line,) = result.stderr.strip().splitlines()
    assert "matplotlib" in line and "pip install" in line


def test_importing_the_package_warns_about_nothing():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import fkv_compile"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == ""  # e.g. torch's "Failed to initialize NumPy"


def test_the_profile_picture_draws_each_curve_once_and_every_head_at_most_once():
    from fkv_compile.tools.plots import _chosen_heads

    scores = [[0.9, 0.1, 0.5], [0.95, 0.2, 0.6]]
    same = [0.1, 0.2, 0.7]
    curves = [[same, [0.5, 0.3, 0.2], same], [same, [0.4, 0.4, 0.2], [0.0, 0.1, 0.9]]]
    picks = _chosen_heads(scores, curves, 3)
    assert len(picks) == len(set(picks))
    drawn = [tuple(curves[a][b]) for a, b in picks]
    assert len(drawn) == len(set(drawn))  # (0, 0), (0, 2) and (1, 0) share a curve: one of them is drawn
    assert picks[:2] == [(1, 0), (0, 1)]  # the most static, then the most dynamic
