"""The package's shape: no import cycles, one errors module, `weights` blind to `models`, a thin CLI over the
public API, small modules, one copy of the shared helpers."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "snzoo"
CLI = REPO / "cli"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """The snzoo modules a file imports, at any level of the file (function bodies too)."""
    name = _module_name(path)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("snzoo")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            if base.startswith("snzoo"):
                out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    resolved = set()
    for target in out:
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), package __init__ files included."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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
                found.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_anywhere_in_the_package():
    assert _cycles() == []


def test_the_cycle_check_finds_a_cycle():
    GRAPH["snzoo.errors"].add("snzoo.zoo")  # zoo imports errors (through its modules): a cycle
    try:
        assert _cycles()
    finally:
        GRAPH["snzoo.errors"].discard("snzoo.zoo")


def test_weights_import_nothing_from_models_and_models_nothing_from_above():
    weights = {m: deps for m, deps in GRAPH.items() if m.startswith("snzoo.weights")}
    assert weights and not any(d.startswith("snzoo.models") for deps in weights.values() for d in deps)
    above = ("snzoo.zoo", "snzoo.weights", "snzoo.hub", "snzoo.eval", "snzoo.train", "snzoo.tools", "snzoo._factory")
    models = {m: deps for m, deps in GRAPH.items() if m.startswith("snzoo.models")}
    assert not any(d.startswith(above) for deps in models.values() for d in deps)


def test_every_error_class_is_defined_in_the_errors_module():
    elsewhere = []
    for name, path in MODULES.items():
        if name == "snzoo.errors":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and (node.name.endswith(("Error", "Warning"))
                                                   and not node.name.startswith("_")):
                elsewhere.append(f"{name}.{node.name}")
    assert elsewhere == []
    errors = importlib.import_module("snzoo.errors")
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.SnzooError)]
    assert len(classes) >= 15 and all(c.__doc__ for c in classes)


def test_no_module_over_400_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {name: n for name, n in sizes.items() if n > 400} == {}


def _cli_imports() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted(CLI.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("snzoo") \
                    and not node.module.startswith("snzoo_cli"):
                found += [(path.name, node.module, a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                found += [(path.name, a.name, "") for a in node.names if a.name.startswith("snzoo.")]
    return found


def test_cli_imports_only_public_modules_and_names():
    imports = _cli_imports()
    assert len(imports) > 10
    for file, module, name in imports:
        assert not any(part.startswith("_") for part in module.split(".")), (file, module)
        assert not name.startswith("_"), (file, module, name)
        imported = importlib.import_module(module)
        if name and not isinstance(getattr(imported, name, None), type(importlib)):
            public = getattr(imported, "__all__", None)
            assert public is not None and name in public, f"{file}: {module}.{name} is not in {module}.__all__"


@pytest.mark.parametrize("helper", ["os.replace(", "def _first_line", "class _NoBar", "def _autocast",
                                    "\nPathLike = ", '"fashion-mnist"'])
def test_shared_helpers_are_written_once(helper):
    holders = [name for name, path in MODULES.items() if helper in path.read_text()]
    assert len(holders) <= 1, holders
