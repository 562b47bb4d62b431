"""The package's import graph (read with ast): no circles, and no import upward across the layers.

The layers, lowest first (docs/design.md, "Layout"): a module may import its own layer and the ones
below it, never one above.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fkv_compile"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("plan", "semantics", "classify", "bundled"),  # the spec (and the plans shipped with it)
    ("config",),
    ("kernels",),  # Triton only
    ("modes",),  # run time
    ("ops",),  # registration of the custom ops
    ("passes",),  # compile time
    ("backend", "report"),
    ("models",),  # the bundled miniatures
    ("tools",),  # CLI, check, bench, quality, ...
    ("",),  # the package root: the public API
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom | ast.Import, modules: set[str]) -> set[str]:
    """The package modules an import statement names (``from . import x`` names module ``x`` if it is one)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.split(".")[0] == "fkv_compile"} & modules
    if node.level == 0:
        base = node.module or ""
        if base.split(".")[0] != "fkv_compile":
            return set()
    else:
        parts = importer.split(".")
        package = parts if is_package else parts[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    submodules = {f"{base}.{a.name}" for a in node.names} & modules
    names_of_base = len(submodules) < len(node.names)  # ``from .x import y`` with y defined in x
    return submodules | ({base} & modules if names_of_base else set())


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = set()
        for node in ast.walk(tree):  # function-level imports count too
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name] |= _resolve(name, path.name == "__init__.py", node, set(modules)) - {name}
    return graph


def layer_of(module: str) -> int:
    first = module.split(".")[1] if "." in module else ""
    for index, names in enumerate(LAYERS):
        if first in names:
            return index
    raise AssertionError(f"module {module} is in no layer of tests/test_layout.py: add it to LAYERS and docs/design.md")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for module in _modules():
        layer_of(module)


def test_no_import_circles():
    assert _cycles(import_graph()) == []


def test_imports_only_go_down():
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a, targets in import_graph().items() for b in targets if layer_of(b) > layer_of(a)]
    assert upward == []


def test_the_spec_imports_only_itself():
    graph = import_graph()
    for module in ("fkv_compile.plan", "fkv_compile.semantics"):
        assert {m for m in graph[module] if layer_of(m) != 0} == set(), module


@pytest.mark.parametrize("source,upward", [
    ("from ..modes.select import compressed_attention", True),  # kernels importing run time
    ("from ..semantics import COSINE_EPS", False),
])
def test_the_check_sees_an_upward_import(source, upward, tmp_path):
    node = ast.parse(source).body[0]
    targets = _resolve("fkv_compile.kernels.attention", False, node, set(_modules()))
    assert targets and any(layer_of(t) > layer_of("fkv_compile.kernels.attention") for t in targets) == upward
