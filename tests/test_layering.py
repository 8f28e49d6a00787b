"""The package's layers, read from the source (design.md): each flows/ module imports alone, no two modules import
each other (not even from inside a function), stages/ never imports Prefect, flows/ never imports torch."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.conftest import REPO

MODULES = sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                 for package in ("flows", "stages") for p in (REPO / package).rglob("*.py"))


def imports(module: str) -> set[str]:
    """Every module `module` imports, at its top or inside a function (`from a import b` counts as a and a.b)."""
    file = REPO.joinpath(*module.split("."))
    file = file / "__init__.py" if file.is_dir() else file.with_suffix(".py")
    package = module.split(".") if file.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join([*package[:len(package) - node.level + 1]] if node.level else [])
            name = ".".join(filter(None, [base, node.module]))
            found |= {name, *(f"{name}.{alias.name}" for alias in node.names)}
    return found


def project_graph() -> dict[str, set[str]]:
    return {module: {m for m in imports(module) if m in MODULES and m != module} for module in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`: its strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_modules_import_each_other():
    assert cycles(project_graph()) == []


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_stages_never_import_prefect_and_flows_never_import_torch():
    assert [m for m in MODULES if m.startswith("stages") and any(i.split(".")[0] == "prefect" for i in imports(m))] \
        == []
    assert [m for m in MODULES if m.startswith("flows") and any(i.split(".")[0] == "torch" for i in imports(m))] == []


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("flows")])
def test_each_flows_module_imports_alone(module: str):
    result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
