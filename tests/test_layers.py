"""The package's layering (issue #32 item 5): methods never import the orchestrator, nothing imports back
up, and no import circle exists, counting the imports inside functions too (read from the source)."""

from __future__ import annotations

import ast
from pathlib import Path

import neurontune

SRC = Path(neurontune.__file__).parent
# what sits above the methods: the orchestrator and the commands built on it
ABOVE_METHODS = {
    "neurontune.pipeline",
    "neurontune.analysis",
    "neurontune.cli",
    "neurontune.export",
    "neurontune.bench",
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imports(path: Path, names: set[str]) -> set[str]:
    """Every neurontune module ``path`` imports, at module level or inside functions, leaving out
    ``if TYPE_CHECKING:`` blocks (annotations only) and the package root (its version and errors)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found = set()
    for n in ast.walk(tree):
        if id(n) in skip:
            continue
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("neurontune"):
            found.add(n.module)
            found.update(f"{n.module}.{a.name}" for a in n.names if f"{n.module}.{a.name}" in names)
        elif isinstance(n, ast.Import):
            found.update(a.name for a in n.names if a.name.startswith("neurontune"))
    return {m for m in found if m in names and m != "neurontune"}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    names = set(mods)
    return {m: _imports(f, names) - {m} for m, f in mods.items()}


def test_methods_never_import_the_orchestrator():
    graph = _graph()
    bad = {m: sorted(graph[m] & ABOVE_METHODS) for m in graph if m.startswith("neurontune.methods")}
    assert not any(bad.values()), bad


def test_below_the_methods_nothing_imports_them_or_anything_above():
    graph = _graph()
    upper = ABOVE_METHODS | {m for m in graph if m.startswith("neurontune.methods")}
    lower = [m for m in graph if m not in upper and m != "neurontune.config"]  # config reads the registry
    bad = {m: sorted(graph[m] & upper) for m in lower if graph[m] & upper}
    assert not bad, bad


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(n) :], n]))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_walk_sees_lazy_imports():  # the checks above would pass vacuously if it did not
    graph = _graph()
    assert "neurontune.selection" in graph["neurontune.methods.rows"]  # imported inside build()
    assert "neurontune.pipeline" in graph["neurontune.cli"]
