"""The import graph, read from the source (ast), not from what happens to be imported at run
time: imports point down (ingest and index below assistant, all three below the app package
mmrag) and no module imports itself through others. Imports inside functions count too."""

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("ingest", "index", "assistant", "ui", "mmrag")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (``from pkg import mod`` counts as pkg.mod)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # import a.b.c of a module a.b: the edge goes to a.b
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def layer(module: str) -> str:
    return module.split(".")[0]


def test_the_graph_is_read():
    g = import_graph()
    assert "index.store" in g["mmrag.wiring"] and "ingest.records" in g["ingest.extract"]
    assert "mmrag.wiring" in g["ui.server"]  # an import inside a function


def test_imports_point_down():
    allowed_below = {
        "ingest": set(),
        "index": set(),
        "assistant": {"index", "ingest"},
        "mmrag": {"ingest", "index", "assistant", "ui"},
        "ui": {"ingest", "index", "assistant", "mmrag"},
    }
    wrong = sorted(f"{m} -> {t}" for m, targets in import_graph().items() for t in targets
                   if layer(t) != layer(m) and layer(t) not in allowed_below[layer(m)])
    assert wrong == []


def test_no_import_cycle():
    g = import_graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert cycles == []
