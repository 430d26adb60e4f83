"""The package's import graph: every module imports, and no two modules import each other,
directly or through others.

Edges are read from the source: every ``import`` statement, at module level or inside a
function (a deferred import is still a dependency), to the module it names —
``from attnfx.x import y`` names ``attnfx.x.y`` when that is a module, else ``attnfx.x``;
a package's own ``__init__`` is not implied by importing one of its modules.  The
variant registry's names are edges too: the module that loads them depends on them.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import networkx as nx
import pytest

import attnfx
from attnfx.variants import VARIANTS

ROOT = Path(attnfx.__file__).resolve().parent

# The modules that load what a registry field names.
REGISTRY_LOADERS = {
    "recognizer": "attnfx.passes.recognize",
    "grammar": "attnfx.fuzz.grammar",
    "reference": "attnfx.nn",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ["attnfx", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imported(name: str, path: Path) -> set[str]:
    """The attnfx modules ``name`` (at ``path``) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets += [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
    out = set()
    for t in targets:
        while t and t not in MODULES:  # an attribute of a module: the module
            t = t.rpartition(".")[0]
        if t and t != name:
            out.add(t)
    return out


def import_graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for name, path in MODULES.items():
        g.add_node(name)
        g.add_edges_from((name, t) for t in _imported(name, path))
    for v in VARIANTS:
        for field, loader in REGISTRY_LOADERS.items():
            target = getattr(v, field)
            if target is not None:
                g.add_edge(loader, target.partition(":")[0])
    return g


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_the_import_graph_has_no_cycles():
    g = import_graph()
    assert g.number_of_edges() > len(MODULES)  # the reader found the imports
    cycles = sorted(nx.simple_cycles(g), key=len)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c + c[:1]) for c in cycles[:20])


def test_the_reader_sees_deferred_and_relative_imports():
    # ops imports the kernels' launcher inside its op, and a cycle through such an
    # import must count
    assert "attnfx.codegen" in _imported("attnfx.ops", MODULES["attnfx.ops"])
    assert "attnfx.cpu" in _imported("attnfx.ops", MODULES["attnfx.ops"])
    assert "attnfx.passes.recognize.softmax" in import_graph()["attnfx.passes.recognize"]
