"""The mutation check (scripts/mutation_check.py) still mutates something: each mutation's text occurs exactly
once in the module it names, so a change to that code must carry its mutation along (two went stale unnoticed
once, when the store's commit was rewritten)."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_mutation_applies_to_exactly_one_place():
    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "scripts" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    stale = {m.name: (ROOT / "fkv_compile" / m.path).read_text().count(m.old) for m in module.MUTATIONS}
    assert {name: n for name, n in stale.items() if n != 1} == {}
    for m in module.MUTATIONS:  # and the tests that should catch it exist
        for test in m.tests:
            path, _, name = test.partition("::")
            source = (ROOT / path).read_text()
            assert not name or f"def {name.split('[')[0]}(" in source, f"{m.name}: no test {test}"
