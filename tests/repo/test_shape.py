"""The shape rankd's code keeps (generated code aside), so that no room grows into a hall:
no module over 500 lines, no class over 300, no function over 60, and no import cycle
between the modules of a package, counting imports under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# folder in the repository -> the package it installs as
PACKAGES = {"agent": "rankd.agent", "client": "rankd.client", "testing": "rankd.testing"}
MAX_MODULE, MAX_CLASS, MAX_FUNCTION = 500, 300, 60


def _modules() -> Iterator[tuple[str, Path]]:
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "_pb2" in path.name:
                continue
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            yield name.removesuffix(".__init__"), path


def _too_big(path: Path) -> list[str]:
    source = path.read_text()
    where = path.relative_to(ROOT)
    found = []
    lines = source.count("\n")
    if lines > MAX_MODULE:
        found.append(f"{where}: {lines} lines (module limit {MAX_MODULE})")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            limit = MAX_CLASS
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            limit = MAX_FUNCTION
        else:
            continue
        size = (node.end_lineno or node.lineno) - node.lineno + 1
        if size > limit:
            found.append(f"{where}:{node.lineno} {node.name}: {size} lines (limit {limit})")
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `name` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_class_or_function_over_its_limit() -> None:
    found = [problem for _, path in _modules() for problem in _too_big(path)]
    assert not found, "over the shape limits:\n" + "\n".join(found)


def test_no_import_cycle_between_modules() -> None:
    modules = dict(_modules())
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_the_cycle_finder_finds_cycles(
    graph: dict[str, set[str]], expected: list[list[str]]
) -> None:
    assert _cycles(graph) == expected


def test_imports_resolve_relative_and_type_checking_imports(tmp_path: Path) -> None:
    module = tmp_path / "cluster.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import report\n"
        "if TYPE_CHECKING:\n"
        "    from rankd.client.launch import run\n"
        "import grpc\n"
    )
    known = {"rankd.client.cluster", "rankd.client.report", "rankd.client.launch"}
    assert _imports("rankd.client.cluster", module, known) == {
        "rankd.client.report",
        "rankd.client.launch",
    }
