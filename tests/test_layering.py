"""The import graph of the product: no circles (imports inside functions included), and the core
(``hallolive_rt/`` but its CLI) imports neither ``export`` nor ``runtime``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# source folder -> package it is installed as (pyproject's package-dir)
PACKAGES = {"hallolive_rt": "hallolive_rt", "export": "hallolive_rt.export", "runtime": "hallolive_rt.runtime"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in PACKAGES.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            rel = f.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Product modules ``name`` imports anywhere in its file (a package's ``__init__`` counts as itself)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                up = base[:len(base) - node.level + 1]
                mod = ".".join(up + ([mod] if mod else []))
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _is_parent_package(a: str, b: str) -> bool:
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_no_import_circles():
    g = _graph()
    # a package's __init__ re-exporting its own submodules is not a circle of the design
    g = {m: {t for t in ts if not _is_parent_package(m, t)} for m, ts in g.items()}
    cycles = _cycles(g)
    assert not cycles, "import circles (imports inside functions included):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_core_imports_neither_export_nor_runtime():
    g = _graph()
    bad = {m: sorted(t for t in ts if t.startswith(("hallolive_rt.export", "hallolive_rt.runtime")))
           for m, ts in g.items()
           if m.startswith("hallolive_rt") and not m.startswith(("hallolive_rt.export", "hallolive_rt.runtime"))
           and m != "hallolive_rt.cli"}
    bad = {m: ts for m, ts in bad.items() if ts}
    assert not bad, f"core modules importing export/runtime: {bad}"


def test_the_graph_sees_function_level_imports():
    g = _graph()
    # cli imports runtime only inside its commands: the graph must still see it
    assert any(t.startswith("hallolive_rt.runtime") for t in g["hallolive_rt.cli"])
