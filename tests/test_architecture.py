"""The package's import graph: no cycle, and a batch's route through ``defectseg.data`` only goes down."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import defectseg

PACKAGE = Path(defectseg.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """defectseg modules imported by a file (at any depth, function-level imports included;
    imports under ``if TYPE_CHECKING`` are not run and not counted)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in known:
                    found.add(full)  # "from defectseg.data import streams": the submodule
                elif base in known:
                    found.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported_modules(path, name, known) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first repeated at the end), or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_relative_and_submodule_imports_are_resolved(tmp_path):
    known = {"defectseg.data", "defectseg.data.streams", "defectseg.data.io"}
    source = tmp_path / "x.py"
    source.write_text("from . import streams\nfrom .io import read_image\nfrom typing import TYPE_CHECKING\n"
                      "if TYPE_CHECKING:\n    from defectseg.data import base\n")
    assert imported_modules(source, "defectseg.data.x", known) == {"defectseg.data.streams", "defectseg.data.io"}


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# lower layers of defectseg.data never import the higher ones
DATA_LAYERS = [
    ["defectseg.data.contract"],
    ["defectseg.data.io", "defectseg.data.records"],
    ["defectseg.data.dataset", "defectseg.data.cache"],
    ["defectseg.data.dli", "defectseg.data.semi"],
    ["defectseg.data.streams"],
    ["defectseg.data.base"],
]


@pytest.mark.parametrize("level", range(len(DATA_LAYERS)))
def test_data_modules_only_import_lower_layers(level):
    graph = import_graph()
    higher = {m for layer in DATA_LAYERS[level + 1 :] for m in layer} | {"defectseg.data"}
    for module in DATA_LAYERS[level]:
        assert module in graph, f"{module} is gone: update DATA_LAYERS"
        upward = graph[module] & higher
        assert not upward, f"{module} imports {sorted(upward)}, which sit above it"
