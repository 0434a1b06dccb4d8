"""The package tree keeps its dependency direction (docs/DESIGN.md, "Layout"), checked from the source.

Every ``import`` of every module under src/lorakit counts, module-level or inside a function (a lazy
import still ties the two modules together), and so does a module named by a string that a module
hands to ``importlib.import_module``. The layers, bottom first::

    errors, threads <- io <- kernels <- quant <- core <- models <- {analysis, export, train, integrations}
        <- serve <- {bench, demos} <- cli

A module may import its own layer's package and anything below, never above, and never a sibling
on its layer (analysis, export and train don't know each other). Inside one subpackage any order is
fine, but no two modules may import each other, directly or round a loop. Nothing imports the
package root (``lorakit/__init__.py``, the public API) but ``__version__``.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

LAYERS: list[set[str]] = [
    {"errors", "threads"},
    {"io"},
    {"kernels"},
    {"quant"},
    {"core"},
    {"models"},
    {"analysis", "export", "train", "integrations"},
    {"serve"},
    {"bench", "demos"},
    {"cli", "__main__"},
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}
ROOT = Path(importlib.util.find_spec("lorakit").origin).parent  # the lorakit under test (PYTHONPATH=src)
ENTRY_POINTS = {"lorakit.__main__", "lorakit.serve.__main__"}  # `python -m ...`: they only call cli


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path) -> list[tuple[str, int, str]]:
    """(imported module, line, what) for every lorakit import in the file, lazy ones included;
    `what` is the imported name, or "importlib" for a module named to importlib.import_module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int, str]] = []
    uses_import_module = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, alias.name) for alias in node.names if _ours(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if _ours(target):
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    full = f"{target}.{alias.name}"
                    found.append((full if full in MODULES else target, node.lineno, alias.name))
        elif isinstance(node, ast.Attribute) and node.attr == "import_module":
            uses_import_module = True
    if uses_import_module:  # e.g. cli.py's table of command modules
        found += [(node.value, node.lineno, "importlib") for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in MODULES
                  and node.value != "lorakit"]
    return found


def _ours(module: str) -> bool:
    return module == "lorakit" or module.startswith("lorakit.")


def _part(module: str) -> str:
    """The top-level part of lorakit a module belongs to ('core', 'serve', 'cli', ...)."""
    return module.split(".")[1] if "." in module else ""


EDGES = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_scan_sees_the_whole_package_and_its_lazy_imports():
    assert {"lorakit.core.model", "lorakit.serve.engine.batcher", "lorakit.cli", "lorakit.quant.nf4"} <= set(MODULES)
    assert set(RANK) >= {_part(m) for m in MODULES if m != "lorakit"}, "a new top-level part needs a layer"
    # a function-level import is found (cli imports the threads module inside main())
    assert any(target == "lorakit.threads" for target, _, _ in EDGES["lorakit.cli"])
    assert ("lorakit.serve.cli", "importlib") in {(t, what) for t, _, what in EDGES["lorakit.cli"]}


def test_every_import_points_down_the_layers():
    wrong = []
    for name, edges in EDGES.items():
        if name == "lorakit" or name in ENTRY_POINTS:
            continue
        for target, line, _ in edges:
            if target == "lorakit":
                continue  # the package root: see the next test
            src, dst = _part(name), _part(target)
            if src == dst:
                continue
            if RANK[dst] >= RANK[src]:
                wrong.append(f"{MODULES[name].relative_to(ROOT.parent)}:{line} imports {target} "
                             f"({src} is on layer {RANK[src]}, {dst} on layer {RANK[dst]})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_nothing_inside_lorakit_imports_the_package_root_but_the_version():
    wrong = [f"{MODULES[name].relative_to(ROOT.parent)}:{line} imports {what!r} from the package root"
             for name, edges in EDGES.items() if name != "lorakit"
             for target, line, what in edges if target == "lorakit" and what != "__version__"]
    assert not wrong, "\n".join(wrong)


def test_the_entry_points_only_reach_the_cli():
    for name in ENTRY_POINTS:
        assert {target for target, _, _ in EDGES[name]} == {"lorakit.cli"}, name


def _graph() -> dict[str, set[str]]:
    """Module -> modules its imports execute: the named module and the packages above it (their
    __init__ runs first), except this module's own packages, which are already being imported."""
    def packages(module: str) -> set[str]:
        parts = module.split(".")
        return {".".join(parts[:i]) for i in range(2, len(parts))}

    graph = {}
    for name, edges in EDGES.items():
        own = packages(name) | {name}
        targets = {t for t, _, _ in edges if t in MODULES}
        targets |= {p for t in targets for p in packages(t) if p in MODULES}
        graph[name] = targets - own - {"lorakit"}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
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
    return found


def test_no_two_modules_import_each_other_even_lazily():
    assert _cycles(_graph()) == []


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set(), "c": {"b"}}, []),
])
def test_the_cycle_finder_finds_loops_and_only_loops(graph, cycle):
    assert _cycles(graph) == cycle


def test_the_cli_only_dispatches():
    """cli.py imports the helpers every command shares and names the command modules (through
    importlib, so `lorakit --help` stays light); no command logic of its own imports anything else."""
    from lorakit.cli import COMMANDS

    edges = EDGES["lorakit.cli"]
    assert {t for t, _, what in edges if what != "importlib"} <= {"lorakit.errors", "lorakit.threads", "lorakit"}
    assert {t for t, _, what in edges if what == "importlib"} == {module for module, _ in COMMANDS.values()}
