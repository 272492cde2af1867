"""Dependencies point down: the import graph of `src/flexemr`, read with `ast` (every import,
including those inside functions and under TYPE_CHECKING)."""

from __future__ import annotations

import ast
import subprocess
import sys
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
LEAVES = ("flexemr.config", "flexemr.memory", "flexemr.logs")


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
        ("flexemr.planner", {"flexemr.planner", "flexemr.model", "flexemr.sharding", *LEAVES}),
        ("flexemr.model", {"flexemr.model", *LEAVES}),
        ("flexemr.sharding", {"flexemr.sharding", *LEAVES}),
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


@pytest.mark.parametrize("leaf", LEAVES)
def test_the_leaves_import_nothing_of_flexemr(leaf: str) -> None:
    """`flexemr.config` (the config sections and their flags), `flexemr.memory` (host memory
    against a process's needs) and `flexemr.logs` (rate limits on log lines peers cause) may be
    used by any layer because they import nothing of flexemr."""
    assert GRAPH[leaf] == set()


def test_importing_the_config_imports_no_torch() -> None:
    """What a config file or a flag needs loads in a bare interpreter (a spec check, a CLI's --help)."""
    heavy = "{'torch', 'numpy'}"
    code = f"import sys, flexemr.config; print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_batch_type_sits_below_its_users() -> None:
    """`flexemr.batch` is what clients send, workloads generate and the ranker scores: it needs
    the model's shape only, so the ranker, the APIs and the workloads can all use it."""
    assert GRAPH["flexemr.batch"] == {"flexemr.model.spec"}
