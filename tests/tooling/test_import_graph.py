"""The package's import graph (issue 21): no two modules import each other, directly or in a loop, and the
kernels import nothing of the host code.

Read from the source with `ast`, every import statement counted wherever it sits (a lazy import inside a
function is still an import of that module), except those under ``if TYPE_CHECKING:`` (never executed).
``from pkg import name`` depends on the submodule ``pkg.name`` when there is one, else on ``pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"dar": ROOT / "dar", "dar.kernels": ROOT / "kernels", "dar.bindings": ROOT / "bindings"}
# kernels/__init__.py imports dar._toplevel only when the checkout's kernels/ folder is imported under the plain
# name `kernels` (to hand the import to the installed package of that name); as dar.kernels it never runs.
SHADOWING_SHIM = ("dar.kernels", "dar._toplevel")


def modules() -> dict[str, Path]:
    found = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([pkg, *parts])] = f
    return found


def _imports(tree: ast.AST):
    """Every import node, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges = {}
    for name, f in mods.items():
        package = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in _imports(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = package[:len(package) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            deps.update(t for t in targets if t in mods and t != name)
        edges[name] = deps
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read():
    edges = graph()
    assert len(edges) > 50
    # A known edge of each import form, so that a reader that found nothing cannot pass.
    assert "dar.call" in edges["dar.api"]  # from .call import ...
    assert "dar.kernels.features" in edges["dar.kernels.attention"]  # from . import features / from .features
    assert "dar.bindings.runtime.state" in edges["dar.bindings.bagel"]  # from .runtime.state import ...


def test_no_module_imports_another_that_imports_it_back():
    assert cycles(graph()) == []


def test_a_loop_would_be_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_kernels_import_nothing_of_the_host_code():
    leaks = {(name, dep) for name, deps in graph().items() if name.startswith("dar.kernels")
             for dep in deps if not dep.startswith("dar.kernels")}
    assert leaks <= {SHADOWING_SHIM}, leaks
