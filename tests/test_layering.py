"""Dependencies point down: the import graph of `src/flexemr`, read with `ast` (every import,
including those inside functions and under TYPE_CHECKING)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _imports() -> dict[str, set[str]]:
    """Each module of the package and the flexemr modules it imports."""
    graph: dict[str, set[str]] = {}
    for path in sorted((SRC / "flexemr").rglob("*.py")):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        graph[module] = {n for n in names if n == "flexemr" or n.startswith("flexemr.")}
    return graph


GRAPH = _imports()


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _arrows(into: tuple[str, ...]) -> list[str]:
    return [
        f"{module} -> {name}"
        for module, names in GRAPH.items()
        for name in names
        if _package(name) in into and _package(module) not in ("flexemr.cli", _package(name))
    ]


def test_the_graph_is_read() -> None:
    assert "flexemr.cli.calibrate" in GRAPH and "flexemr.planner.placement" in GRAPH
    assert "flexemr.sharding.plan" in GRAPH["flexemr.planner.placement"]


def test_nothing_but_the_cli_imports_the_cli_or_the_benchmark_harness() -> None:
    assert _arrows(("flexemr.cli", "flexemr.bench")) == []


@pytest.mark.parametrize(
    ("package", "allowed"),
    [
        ("flexemr.planner", {"flexemr.planner", "flexemr.model", "flexemr.memory", "flexemr.sharding"}),
        ("flexemr.model", {"flexemr.model", "flexemr.memory"}),
        ("flexemr.sharding", {"flexemr.sharding"}),
    ],
)
def test_the_planner_depends_on_the_model_and_sharding_only(package: str, allowed: set[str]) -> None:
    outside = {
        f"{module} -> {name}"
        for module, names in GRAPH.items()
        if _package(module) == package
        for name in names
        if _package(name) not in allowed
    }
    assert outside == set()


def test_the_memory_check_is_a_leaf() -> None:
    """`flexemr.memory` (host memory against a process's needs) may be used by any layer because it
    imports nothing of flexemr."""
    assert GRAPH["flexemr.memory"] == set()


def test_the_batch_type_sits_below_its_users() -> None:
    """`flexemr.batch` is what clients send, workloads generate and the ranker scores: it needs
    the model's shape only, so the ranker, the APIs and the workloads can all use it."""
    assert GRAPH["flexemr.batch"] == {"flexemr.model.spec"}
