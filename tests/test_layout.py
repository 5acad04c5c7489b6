"""Package layout: every module imports on its own, and the package's import graph has no cycles."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import dust3r_ns

PKG_DIR = Path(dust3r_ns.__file__).resolve().parent
PKG = "dust3r_ns"

# Import cycles that are being removed elsewhere, each as the set of modules of its strongly connected component.
# The test fails on any other cycle, and on a listed one that grows.
KNOWN_CYCLES: list[frozenset[str]] = []   # none: keep it that way


def _modules() -> dict[str, Path]:
    """Module name -> file, for every .py file of the package (a package is named by its __init__.py)."""
    out = {}
    for f in sorted(PKG_DIR.rglob("*.py")):
        parts = (PKG,) + f.relative_to(PKG_DIR).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers inside `if TYPE_CHECKING:` blocks (imports there never run)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            t = node.test
            name = t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                for sub in node.body:
                    lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    """module -> package modules it imports anywhere in its file (module level or inside functions), relative
    imports resolved; `from pkg import name` counts as importing pkg.name when that is a module, else pkg."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_lines(tree)
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
            for t in targets:
                while t and t not in mods and t.startswith(PKG + "."):   # `import pkg.mod.attr` -> pkg.mod
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != mod:
                    graph[mod].add(t)
    return graph


def _sccs(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components (Tarjan), iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[set[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[v] = min(low[v], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                out.append(comp)
    return out


def _a_cycle(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """One cycle through the component's smallest module (breadth-first: a shortest one)."""
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start] + path[::-1][1:] + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return [start]


def test_import_graph_has_no_cycles():
    graph = import_graph()
    assert "dust3r_ns.align.api" in graph and graph["dust3r_ns.align.api"], "import graph looks empty"
    cycles = [c for c in _sccs(graph) if len(c) > 1]
    unexpected = [c for c in cycles if frozenset(c) not in KNOWN_CYCLES]
    msg = "\n".join(" -> ".join(_a_cycle(graph, c)) + f"   (component: {sorted(c)})" for c in unexpected)
    assert not unexpected, f"import cycles in {PKG}:\n{msg}"


def test_import_graph_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    (comp,) = [c for c in _sccs(g) if len(c) > 1]
    assert comp == {"a", "b", "c"} and _a_cycle(g, comp) == ["a", "b", "c", "a"]


_IMPORT_EACH = r"""
import importlib, json, sys, traceback
import numpy, torch                       # third-party modules stay loaded; the package's are dropped each time
failed = {}
for name in json.loads(sys.argv[1]):
    for m in [m for m in sys.modules if m == "dust3r_ns" or m.startswith("dust3r_ns.")]:
        del sys.modules[m]
    try:
        importlib.import_module(name)
    except BaseException:
        failed[name] = traceback.format_exc(limit=-3)
print(json.dumps(failed))
"""


def test_every_module_imports_on_its_own():
    """Each module imported first, with none of the package's modules loaded (one interpreter; the package's
    modules are removed from sys.modules before each import). `__main__` modules run their command: left out."""
    names = sorted(m for m in _modules() if not m.endswith(".__main__"))
    res = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(names)], capture_output=True, text=True,
                         timeout=600, cwd=PKG_DIR.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    failed = json.loads(res.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{k}:\n{v}" for k, v in failed.items())
