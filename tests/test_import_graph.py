"""mu_fast's import graph has no cycles, and its lower layers import nothing from its upper ones.

The graph is read from the source with ``ast``; nothing is imported. Its nodes are the modules under ``mu_fast/`` and
``kernels/`` (installed as ``mu_fast.kernels``). Its edges:

* every ``import`` / ``from ... import`` anywhere in a module: at the top, inside functions, under
  ``if TYPE_CHECKING:`` (a lazy or type-only import is still a use);
* ``import a.b.c``: an edge to ``a.b.c`` (to its longest prefix that is a mu_fast module, if it is not one);
  ``from a.b import c``: to ``a.b.c`` when that is a module, else to ``a.b``; relative imports are resolved against
  the importing module's package;
* a module that calls ``import_module`` imports every mu_fast module whose name it spells as a string (the lazy
  re-export tables of ``mu_fast.models`` and ``mu_fast.sweep``): a string-based import is an import too;
* an import of one of the module's own ancestor packages (``mu_fast.cli.demo`` importing ``mu_fast.cli``, anything
  importing ``mu_fast``) is no edge: it runs the package's ``__init__``, which is running already or done.

A cycle is a strongly connected component of more than one module; the failure names every one, with a cycle through
it and the lines of its imports. Break one by moving what both modules need into a lower module, or by passing a
function or class in as an argument; not by hiding the import.

Layers. The lower layer is the library: models, data, masks, optim, localize, edit, evaluate, memory, the kernels,
the organism, and the shared utilities (files, provenance, determinism, console, stats, worker_lifetime, _ext). The
upper layer runs many runs and talks to users: sweep, pipeline, aggregate, report, the CLI, the
paper protocol (it builds sweep specs) and preflight (the CLI's option checks). A lower module imports no upper one.
The organism is lower (``mu_fast.models.loading`` loads it) except ``mu_fast.organism.lr_choice``, which runs the
sweep engine to choose the demo's learning rates and is upper: reading the stored choice, which it re-exports, is
lower (``mu_fast.organism.stored_lrs``; the sweep presets read it).
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (folder, the package name it installs as)
SOURCES = ((REPO / "mu_fast", "mu_fast"), (REPO / "kernels", "mu_fast.kernels"))

LOWER = ("mu_fast.models", "mu_fast.data", "mu_fast.masks", "mu_fast.optim", "mu_fast.localize", "mu_fast.edit",
         "mu_fast.evaluate", "mu_fast.memory", "mu_fast.kernels", "mu_fast.organism", "mu_fast.files",
         "mu_fast.provenance", "mu_fast.determinism", "mu_fast.console", "mu_fast.stats", "mu_fast.worker_lifetime",
         "mu_fast._ext")
UPPER = ("mu_fast.sweep", "mu_fast.pipeline", "mu_fast.aggregate", "mu_fast.report",
         "mu_fast.cli", "mu_fast.paper_protocol", "mu_fast.preflight")
# Modules under a LOWER package that belong to the upper layer (module docstring).
UPPER_IN_LOWER = ("mu_fast.organism.lr_choice",)


def modules(sources=SOURCES) -> dict[str, tuple[Path, bool]]:
    """``{module name: (file, is a package __init__)}``."""
    out = {}
    for folder, package in sources:
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            out[".".join([package, *parts])] = (path, is_package)
    return out


def _known(name: str, mods) -> str | None:
    """``name`` or its longest prefix that is a module of ``mods`` (None outside them)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node: ast.AST, module: str, is_package: bool, mods) -> list[str]:
    if isinstance(node, ast.Import):
        return [t for alias in node.names if (t := _known(alias.name, mods))]
    if node.level:
        base = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    out = []
    for alias in node.names:
        target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else _known(base, mods)
        if target:
            out.append(target)
    return out


def import_graph(sources=SOURCES) -> dict[str, dict[str, int]]:
    """``{module: {imported module: line of the first import}}`` under the rules of the module docstring."""
    mods = modules(sources)
    graph: dict[str, dict[str, int]] = {}
    for module, (path, is_package) in mods.items():
        edges: dict[str, int] = {}
        tree = ast.parse(path.read_text(), filename=str(path))
        string_imports = "import_module" in path.read_text()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = _targets(node, module, is_package, mods)
            elif string_imports and isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in mods:
                targets = [node.value]
            else:
                continue
            for target in targets:
                if target == module or module.startswith(target + "."):  # itself, or one of its own packages
                    continue
                edges[target] = min(edges.get(target, node.lineno), node.lineno)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def a_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module: ``[a, b, ..., a]``."""
    start, members = component[0], set(component)
    parent = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node]):
            if child == start:
                path = [node]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if child in members and child not in parent:
                parent[child] = node
                queue.append(child)
    return component


def describe(graph: dict[str, dict[str, int]], component: list[str]) -> str:
    """The component's modules, then one cycle through it with the file and line of each import."""
    files = modules()
    cycle = a_cycle(graph, component)
    lines = [f"{len(component)} modules import each other: {', '.join(component)}",
             "  for one: " + " -> ".join(cycle)]
    for module, target in zip(cycle, cycle[1:]):
        lines.append(f"    {files[module][0].relative_to(REPO)}:{graph[module][target]}: {module} imports {target}")
    return "\n".join(lines)


def _under(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def layer_violations(graph: dict[str, dict[str, int]]) -> list[str]:
    files = modules()
    out = []
    for module, edges in sorted(graph.items()):
        if not _under(module, LOWER) or _under(module, UPPER_IN_LOWER):
            continue
        for target, line in sorted(edges.items()):
            if _under(target, UPPER) or _under(target, UPPER_IN_LOWER):
                out.append(f"{files[module][0].relative_to(REPO)}:{line}: {module} (lower layer) imports {target} "
                           "(upper layer)")
    return out


def test_mu_fast_has_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, f"{len(found)} import cycle(s) in mu_fast:\n" + "\n".join(describe(graph, c) for c in found)


def test_the_lower_layers_import_nothing_from_the_upper_ones():
    bad = layer_violations(import_graph())
    assert not bad, "lower layers import upper ones:\n" + "\n".join(bad)


def test_the_graph_sees_lazy_relative_and_string_imports():
    """The rules hold on mu_fast itself: imports inside functions, ``from pkg import module``, the lazy re-export
    tables, and a module's own packages left out."""
    graph = import_graph()
    assert "mu_fast.pipeline" in graph["mu_fast.cli.common"]  # inside report_run
    assert "mu_fast.cli.demo" in graph["mu_fast.cli"]  # from mu_fast.cli import demo
    assert "mu_fast.sweep.engine" in graph["mu_fast.sweep"]  # the lazy table of mu_fast.sweep's re-exports
    assert "mu_fast.kernels.masked_adamw" in graph["mu_fast.kernels.masked_adamw8bit"]
    assert "mu_fast.cli" not in graph["mu_fast.cli.demo"] and "mu_fast" not in graph["mu_fast.cli.env"]


def _package(root: Path, files: dict[str, str]) -> tuple[tuple[Path, str], ...]:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return ((root / "pkg", "pkg"),)


def test_a_cycle_through_a_function_level_relative_import_is_found(tmp_path):
    sources = _package(tmp_path, {
        "__init__.py": '"""A package."""\nfrom pkg.a import f\n',
        "a.py": "from pkg import b\n\ndef f():\n    return b.g()\n",
        "b.py": "def g():\n    from .sub import c\n    return c\n",
        "sub/__init__.py": "from .. import a\n",  # a child importing its ancestor's sibling: an edge
        "sub/c.py": "import pkg.sub\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import f\n",
        "d.py": "from importlib import import_module\n_LAZY = {'x': 'pkg.a'}\n",
        "e.py": "import pkg\nfrom pkg import a\n",
    })
    graph = import_graph(sources)
    assert graph["pkg.a"] == {"pkg.b": 1} and graph["pkg.b"] == {"pkg.sub.c": 2}
    assert graph["pkg.sub"] == {"pkg.a": 1} and graph["pkg.sub.c"] == {"pkg.a": 4}  # own package `pkg.sub` left out
    assert graph["pkg.d"] == {"pkg.a": 2} and graph["pkg.e"] == {"pkg.a": 2}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert a_cycle(graph, ["pkg.a", "pkg.b", "pkg.sub.c"]) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]


def test_every_package_says_what_it_is():
    """Each package's ``__init__`` starts with a docstring saying what the folder holds."""
    missing = [name for name, (path, is_package) in modules().items()
               if is_package and not ast.get_docstring(ast.parse(path.read_text()))]
    assert not missing, f"packages without a docstring in their __init__.py: {missing}"
