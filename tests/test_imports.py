"""The package's import graph: no cycle anywhere, and data flows one way (data -> training / evaluation).

The graph is read from the source (every `import` / `from ... import`, at module level or inside a function), so
a cycle that only a late, function-level import would close is caught too, and nothing is executed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "leanvlp"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package at `root` (a package is its __init__)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports. `from x import y` goes to `x.y` when that is a module,
    otherwise to `x` (a name defined in x, or re-exported by x's __init__)."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, grey/black marking)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in graph[stack.pop()] - seen:
            seen.add(nxt)
            stack.append(nxt)
    return seen


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "pkg"


def test_the_walker_finds_a_cycle_closed_by_a_function_level_import(tmp_path):
    pkg = _write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import g\n",
        "pkg/sub/__init__.py": "from .c import h\n",
        "pkg/sub/c.py": "def h():\n    from ..a import f\n",
        "pkg/b.py": "from .sub import h\ndef g(): ...\n",
    })
    graph = import_graph(pkg)
    assert graph["pkg.b"] == {"pkg.sub"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.a"]


def test_the_walker_resolves_submodules_and_absolute_imports_without_false_cycles(tmp_path):
    pkg = _write_package(tmp_path, {
        "pkg/__init__.py": "from . import a\nfrom .data import x\n",
        "pkg/a.py": "import pkg.data.x\nfrom pkg.data import x\n",
        "pkg/data/__init__.py": "from .x import X\n",
        "pkg/data/x.py": "import os\nX = 1\n",
    })
    graph = import_graph(pkg)
    assert graph["pkg"] == {"pkg.a", "pkg.data.x"} and graph["pkg.a"] == {"pkg.data.x"}
    assert find_cycle(graph) is None


def test_no_import_cycle_in_leanvlp():
    graph = import_graph(PACKAGE)
    assert {"leanvlp.training.cli", "leanvlp.evaluation.cli", "leanvlp.data.pairs"} <= set(graph)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


@pytest.mark.parametrize("module", ["leanvlp.evaluation", "leanvlp.data", "leanvlp.modeling.modeling_merge_bridge",
                                    "leanvlp.processing.processing_patch_align", "leanvlp.metrics"])
def test_data_flows_one_way_nothing_below_the_recipes_reaches_training(module):
    """Training may call evaluation; evaluation, data, models and metrics never import the training recipe."""
    graph = import_graph(PACKAGE)
    assert not {m for m in reachable(graph, module) if m.startswith("leanvlp.training")}


def test_data_modules_reach_neither_recipe():
    graph = import_graph(PACKAGE)
    for module in ("leanvlp.data.pairs", "leanvlp.data.collate"):
        assert not {m for m in reachable(graph, module) if m.startswith(("leanvlp.training", "leanvlp.evaluation"))}
