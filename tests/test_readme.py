"""The README's two commands are the ones CI and users run."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    return [line.strip() for line in lines if line.strip().startswith("python3 -m venv .venv")]


def test_ci_runs_the_readme_test_command():
    demo, tests = _readme_commands()
    assert "examples/self_forcing_mini.py" in demo
    assert "pytest" in tests
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci


def test_the_readme_is_a_front_page_whose_links_resolve():
    import re

    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\(((?:docs|examples|scripts|benchmarks)/[^)#]+)", text)
    assert links and all((ROOT / link).exists() for link in links), [link for link in links if not (ROOT / link).exists()]
    for page in (ROOT / "docs").glob("*.md"):  # the pages' links to each other and to the code
        for link in re.findall(r"\]\(([\w./-]+\.md)", page.read_text()):
            assert (page.parent / link).exists(), f"{page.name} links to {link}, which does not exist"


def test_the_cli_flow_the_readme_shows_runs_as_written(tmp_path):
    """Each command of the README's CLI block, in a fresh directory, in a fresh process, as a user types it."""
    import os
    import re
    import shlex
    import subprocess
    import sys

    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- cli-flow:begin -->\n(.*?)<!-- cli-flow:end -->", text, re.S).group(1)
    commands = [shlex.split(line.strip()) for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["fkv", "profile"], ["fkv", "plan"], ["fkv", "check"], ["fkv", "bench"]]
    fkv = [sys.executable, "-m", "fkv_compile.tools.cli"]  # the console script, from this interpreter
    for argv in commands:
        done = subprocess.run(fkv + argv[1:], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONWARNINGS": "error::UserWarning:fkv_compile"})
        assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr
    assert (tmp_path / "plan.json").exists() and (tmp_path / "bench_results" / "bench_mini-windowed.json").exists()


def test_the_demo_shows_facts_then_paired_times_beside_their_limit(monkeypatch, capsys):
    """The demo end to end at the bench's tiny geometry (the real one takes minutes: it is what the README runs)."""
    import importlib.util

    from fkv_compile.tools import bench

    spec = importlib.util.spec_from_file_location("demo", ROOT / "examples" / "self_forcing_mini.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    tiny = bench.BenchSettings(geometry="mini-windowed", side=1, layers=1, heads=2, head_dim=16, repeats=2,
                               lowering="aot_eager")
    monkeypatch.setattr(demo, "demo_settings", lambda rounds: tiny)
    monkeypatch.setattr("sys.argv", ["self_forcing_mini.py", "--rounds", "2"])
    demo.main()
    out = capsys.readouterr().out
    facts, timing, model = out.index("1. What each"), out.index("2. Memory and time"), out.index("3. At real size")
    assert facts < timing < model
    assert "a static head keeps" in out and "KV cache: dense" in out and "compact store" in out
    assert "median of 2 same-round ratios" in out and "the best the kept tokens allow" in out


def test_the_design_pages_name_files_and_names_that_exist():
    """docs/design.md and docs/walkthrough.md name modules (``passes/fit.py``) and what is in them
    (``passes/fit.check_plan_fits``): each must exist, so that a rename leaves no stale page behind."""
    import re

    package = ROOT / "fkv_compile"
    stale = []
    for page in ("design.md", "walkthrough.md"):
        text = (ROOT / "docs" / page).read_text()
        for path in re.findall(r"`((?:[a-z_]+/)+[a-z_]+\.py)`", text):
            if not (package / path).exists() and not (ROOT / path).exists():
                stale.append(f"{page}: {path}")
        for module, name in re.findall(r"`((?:[a-z_]+/)+[a-z_]+)\.([A-Za-z_]\w*)", text):
            if name == "py":
                continue
            file = package / f"{module}.py"
            if not file.exists() and (package / module / "__init__.py").exists():
                file = package / module / "__init__.py"
            if not file.exists() or not re.search(rf"\b{name}\b", file.read_text()):
                stale.append(f"{page}: {module}.{name}")
    assert not stale
