"""The package's import graph: no cycle anywhere, and the layers point one way.

Every ``import`` of a ``ramda_ds`` module counts, at module level or inside a function (a lazy
import is still a dependency), except those under ``if TYPE_CHECKING:`` (annotations only). An
import of ``pkg.sub`` is an edge to the module ``pkg.sub``; ``from pkg import name`` is an edge to
``pkg.name`` when that is a module, else to ``pkg`` itself (its ``__init__``)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for f in sorted((root / "ramda_ds").rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _runtime_imports(tree: ast.AST):
    """Import nodes, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = modules(root)

    def known(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, f in mods.items():
        is_pkg = f.name == "__init__.py"
        deps = set()
        for node in _runtime_imports(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    pkg = ".".join(base + ([node.module] if node.module else []))
                else:
                    pkg = node.module
                targets = [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in mods else pkg
                           for a in node.names]
            for t in targets:
                t = known(t)
                if t is not None and t != mod:
                    deps.add(t)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def test_the_checker_finds_a_cycle(tmp_path):
    """The checker itself: a two-module cycle through a lazy import is found, a TYPE_CHECKING one
    is not."""
    pkg = tmp_path / "ramda_ds"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import a\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from ..b import g\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nfrom .c import h\n"
                              "if TYPE_CHECKING:\n    from .sub import a\n")
    (pkg / "c.py").write_text("from .sub.a import f\n")
    graph = import_graph(tmp_path)
    assert graph["ramda_ds.b"] == {"ramda_ds.c"}
    assert cycles(graph) == [["ramda_ds.b", "ramda_ds.c", "ramda_ds.sub.a"]]


def test_no_import_cycle_among_ramda_ds_modules():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("low, high", [
    ("ramda_ds.kernels", "ramda_ds.optim"),  # kernels execute a plan; they never see an optimizer
    ("ramda_ds.kernels", "ramda_ds.training"),
    ("ramda_ds.solvers", "ramda_ds.optim"),
    ("ramda_ds.regularizers", "ramda_ds.optim"),
    ("ramda_ds.export", "ramda_ds.training"),  # export reads checkpoints through the public reader
    ("ramda_ds.optim", "ramda_ds.training"),
])
def test_a_lower_layer_imports_nothing_from_a_higher_one(low, high):
    graph = import_graph()
    bad = sorted((m, d) for m, deps in graph.items() if m == low or m.startswith(low + ".")
                 for d in deps if d == high or d.startswith(high + "."))
    assert not bad, f"{low} imports {high}: {bad}"
