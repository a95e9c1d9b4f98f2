"""The import structure the architecture relies on (docs/ARCHITECTURE.md, "Rooms"): read from the
source's imports, so it fails when a cycle, a private import across packages, a training import in the
runtime or an import of a higher room in qnas.runs comes back."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = ("qnas", "qops")


def _modules() -> dict[str, Path]:
    mods = {}
    for base, top in ((ROOT / "python", "qnas"), (ROOT, "qops")):
        for p in sorted((base / top).rglob("*.py")):
            name = ".".join(p.relative_to(base).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p
    return mods


def _room(module: str) -> str:
    """The package a module belongs to: qnas.<x> / qops.<x> (a module directly in qnas/ is its own room)."""
    return ".".join(module.split(".")[:2])


def _module_level_imports(path: Path, *, lazy: bool = False):
    """(imported module, names) of the imports at module level, and with `lazy` also those in functions
    (function-level imports are lazy on purpose: they are how a lower room reaches an optional higher one
    without a cycle at import time)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree) if lazy else tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in FIRST_PARTY:
                yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in FIRST_PARTY:
                    yield a.name, []


def _room_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for mod, path in _modules().items():
        for target, _ in _module_level_imports(path):
            if _room(target) != _room(mod):
                graph.setdefault(_room(mod), set()).add(_room(target))
    return graph


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycle_between_rooms():
    graph = _room_graph()
    cycles = sorted(room for room in graph if room in _reaches(graph, room))
    assert not cycles, f"rooms on an import cycle: {cycles}"


def test_no_private_name_is_imported_across_rooms():
    bad = [
        f"{mod} imports {target}.{name}"
        for mod, path in _modules().items()
        for target, names in _module_level_imports(path, lazy=True)
        for name in names
        if name.startswith("_") and name != "_C" and _room(target) != _room(mod)
    ]
    assert not bad, bad


def test_the_runtime_and_the_kernels_import_no_training_code():
    graph = _room_graph()
    training = {
        "qnas.train",
        "qnas.runs",
        "qnas.nas",
        "qnas.quant",
        "qnas.sr",
        "qnas.cli",
        "qnas.api",
        "qnas.demo",
        "qnas.export",
    }
    assert not _reaches(graph, "qnas.deploy") & training, _reaches(graph, "qnas.deploy")
    for room in (r for r in graph if r.startswith("qops")):
        assert not any(r.startswith("qnas") for r in _reaches(graph, room)), room


def test_the_graph_is_read_from_the_real_tree():
    graph = _room_graph()
    assert "qnas.quant" in graph["qnas.export"] and "qops" in graph["qnas.quant"]


def test_runs_import_no_job_of_theirs():
    """qnas.runs is the bottom layer of the jobs: they import it, it imports none of them, not even lazily."""
    above = ("qnas.train", "qnas.nas", "qnas.quant", "qnas.export", "qnas.deploy", "qnas.cli", "qnas.api")
    bad = [
        f"{mod} imports {target}"
        for mod, path in _modules().items()
        if _room(mod) == "qnas.runs"
        for target, _ in _module_level_imports(path, lazy=True)
        if _room(target) in above
    ]
    assert not bad, bad
    graph = _room_graph()
    for room in ("qnas.train", "qnas.nas", "qnas.quant", "qnas.export"):
        assert "qnas.runs" in graph[room], room
