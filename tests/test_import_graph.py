"""The import structure the architecture relies on (docs/ARCHITECTURE.md, "Rooms"): read from the
source's module-level imports, so it fails when a cycle, a private import across packages or a
training import in the runtime comes back."""

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


def _module_level_imports(path: Path):
    """(imported module, names) of the imports at module level (function-level imports are lazy on purpose:
    they are how a lower room reaches an optional higher one without a cycle at import time)."""
    for node in ast.parse(path.read_text()).body:
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
        for target, names in _module_level_imports(path)
        for name in names
        if name.startswith("_") and name != "_C" and _room(target) != _room(mod)
    ]
    assert not bad, bad


def test_the_runtime_and_the_kernels_import_no_training_code():
    graph = _room_graph()
    training = {"qnas.train", "qnas.nas", "qnas.quant", "qnas.sr", "qnas.cli", "qnas.demo", "qnas.export"}
    assert not _reaches(graph, "qnas.deploy") & training, _reaches(graph, "qnas.deploy")
    for room in (r for r in graph if r.startswith("qops")):
        assert not any(r.startswith("qnas") for r in _reaches(graph, room)), room


def test_the_graph_is_read_from_the_real_tree():
    graph = _room_graph()
    assert "qnas.quant" in graph["qnas.export"] and "qops" in graph["qnas.quant"]
