"""The package layout of docs/layout.md: each package imports only the packages below it, and no
module imports itself round a circle (imports inside functions included)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Lowest first: a package may import those before it, never one after it.
LAYERS = ["runtime", "config", "runs", "data", "model", "metrics", "gallery", "pipeline"]


def _imports():
    """{module name: set of project module names it imports}, for every package module."""
    graph = {}
    for pkg in LAYERS:
        for path in sorted((ROOT / pkg).glob("*.py")):
            name = f"{pkg}.{path.stem}" if path.stem != "__init__" else pkg
            found = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module)
                    found.update(f"{node.module}.{a.name}" for a in node.names)
                elif isinstance(node, ast.Import):
                    found.update(a.name for a in node.names)
            graph[name] = found
    return {m: {i for i in found if i in graph and i != m} for m, found in graph.items()}


def test_every_package_is_in_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "benchmarks"}
    assert packages == set(LAYERS), "add the new package to LAYERS and docs/layout.md"


def test_no_package_imports_a_package_above_it():
    upward = [
        f"{m} imports {i}"
        for m, found in _imports().items()
        for i in found
        if LAYERS.index(i.split(".")[0]) > LAYERS.index(m.split(".")[0])
    ]
    assert upward == []


def test_no_module_imports_round_a_circle():
    graph = _imports()
    circles = []

    def visit(module, path):
        for nxt in sorted(graph[module]):
            if nxt == path[0]:
                circles.append(" -> ".join(path + [nxt]))
            elif nxt not in path and nxt > path[0]:  # each circle found once, from its least module
                visit(nxt, path + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert circles == []
