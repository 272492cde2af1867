"""Dependencies point down: the import graph of `src/flexemr`, read with `ast` (every import,
including those inside functions and under TYPE_CHECKING), checked against the layers of DESIGN.md.

A package is `flexemr.<name>` (a folder, or a top-level module such as `flexemr.batch`). Each
package may import only the packages `ALLOWED` pins for it, each in its own layer or below; the
package graph has no cycle. A new arrow fails here until it is added to `ALLOWED`, and one that runs
up the layers cannot be added: move the code to where it belongs instead.
"""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("cli",),  # commands (top)
    ("bench", "calibrate"),  # measurements: they start deployments
    ("entrypoints",),  # processes built from a spec: RankerProcess, EmbeddingServerProcess, local, Ray
    ("api",),  # HTTP/gRPC fronts and the admin API: decode, encode, refuse
    ("ranker", "updates", "cache"),  # score a batch at one row version; apply row updates; hot rows
    ("engine", "transport"),  # clients of embedding servers behind one lookup interface
    ("embedding_server",),  # store, row versions, server loop
    ("planner", "workload", "client"),  # offline planning, generated load, the HTTP client
    ("sharding", "model", "batch"),  # plans and routers; DLRM, weights, row formats; a batch's arrays
    ("protocol",),  # frames, handshake, updates on the wire
    ("memory", "rwlock", "stats", "logs", "extras"),  # small helpers every layer may use
    ("config",),  # dataclasses only (bottom)
)
"""DESIGN.md's layers, top first. A package imports only from its own layer or the ones below."""

ALLOWED: dict[str, set[str]] = {
    "cli": {"bench", "calibrate", "client", "config", "entrypoints", "extras", "memory", "model", "planner",
            "ranker", "sharding", "transport", "updates", "workload"},
    "bench": {"batch", "client", "config", "entrypoints", "extras", "model", "sharding", "updates",
              "workload"},
    "calibrate": {"batch", "config", "entrypoints", "model", "planner", "sharding"},
    "entrypoints": {"api", "batch", "client", "config", "embedding_server", "engine", "extras", "memory",
                    "model", "ranker", "sharding", "transport"},
    "api": {"batch", "config", "extras", "logs", "model", "ranker", "stats", "transport", "updates"},
    "ranker": {"batch", "cache", "config", "engine", "model", "protocol", "rwlock", "sharding", "stats",
               "transport", "updates"},
    "updates": {"config", "engine", "extras", "model", "protocol", "transport"},
    "cache": {"config", "model", "stats"},
    "engine": {"config", "protocol", "stats", "transport"},
    "transport": {"config", "embedding_server", "extras", "model", "protocol", "stats"},
    "embedding_server": {"config", "logs", "model", "protocol", "rwlock", "stats"},
    "planner": {"config", "model", "sharding"},
    "workload": {"batch", "model"},
    "client": set(),
    "sharding": {"config"},
    "model": {"config", "memory"},
    "batch": {"model"},
    "protocol": {"config"},
    "memory": set(),
    "rwlock": set(),
    "stats": set(),
    "logs": set(),
    "extras": set(),
    "config": set(),
}  # fmt: skip
"""What each package imports today: a new arrow is a decision, taken here."""


def module_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Each module of the package and the flexemr modules it imports."""
    graph: dict[str, set[str]] = {}
    for path in sorted((src / "flexemr").rglob("*.py")):
        module = ".".join(path.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        graph[module] = {n for n in names if n == "flexemr" or n.startswith("flexemr.")}
    return graph


def package(module: str) -> str:
    """`flexemr.engine.link` -> `engine`; `flexemr.batch` -> `batch`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def package_graph(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    """Each package and the other packages its modules import."""
    graph: dict[str, set[str]] = {}
    for module, names in modules.items():
        if package(module):
            graph.setdefault(package(module), set()).update(
                package(n) for n in names if package(n) not in ("", package(module))
            )
    return graph


def wrong_arrows(
    modules: dict[str, set[str]], layers: tuple[tuple[str, ...], ...], allowed: dict[str, set[str]]
) -> list[str]:
    """The module imports that run up the layers, or that `allowed` does not pin, each named."""
    rank = {name: depth for depth, layer in enumerate(layers) for name in layer}
    wrong = []
    for module, names in sorted(modules.items()):
        for name in sorted(names):
            source, target = package(module), package(name)
            if source in ("", target) or target == "":
                continue
            if source not in rank or target not in rank:
                wrong.append(f"{module} -> {name}: a package missing from LAYERS")
            elif rank[target] < rank[source]:
                wrong.append(f"{module} -> {name}: {source} is below {target}")
            elif target not in allowed.get(source, set()):
                wrong.append(f"{module} -> {name}: not in ALLOWED[{source!r}]")
    return wrong


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """A cycle of the graph (its nodes, the first one again at the end), or [] when it has none."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        found: list[str] = exc.args[1]
        return found
    return []


MODULES = module_graph()
PACKAGES = package_graph(MODULES)


def test_the_graph_is_read() -> None:
    assert "flexemr.cli.calibrate" in MODULES and "flexemr.planner.placement" in MODULES
    assert "flexemr.config.plan" in MODULES["flexemr.planner.placement"]
    assert PACKAGES["planner"] == {"config", "model", "sharding"}


def test_every_package_has_a_layer_and_its_pinned_imports() -> None:
    assert set(PACKAGES) == set(ALLOWED) == {name for layer in LAYERS for name in layer}


def test_the_pins_follow_the_layers() -> None:
    rank = {name: depth for depth, layer in enumerate(LAYERS) for name in layer}
    upward = {f"{p} -> {q}" for p, names in ALLOWED.items() for q in names if rank[q] < rank[p]}
    assert upward == set()


def test_no_import_runs_up_or_outside_the_pins() -> None:
    assert wrong_arrows(MODULES, LAYERS, ALLOWED) == []


def test_the_pins_are_all_used() -> None:
    """An arrow that went away is taken out of `ALLOWED`, so the pins say what the code does."""
    assert {p: ALLOWED[p] - PACKAGES[p] for p in ALLOWED if ALLOWED[p] - PACKAGES[p]} == {}


def test_the_package_graph_has_no_cycle() -> None:
    assert cycle(PACKAGES) == []


def test_the_checker_catches_an_upward_import_a_new_arrow_and_a_cycle() -> None:
    """The checks above on a small graph made to break them."""
    layers = (("ranker",), ("engine",), ("protocol",))
    allowed = {"ranker": {"engine", "protocol"}, "engine": {"protocol"}, "protocol": set()}
    good = {
        "flexemr.ranker.ranker": {"flexemr.engine.link", "flexemr.ranker.admission"},
        "flexemr.engine.link": {"flexemr.protocol.frames"},
        "flexemr.protocol.frames": set(),
    }
    assert wrong_arrows(good, layers, allowed) == []
    assert cycle(package_graph(good)) == []

    upward = {**good, "flexemr.protocol.frames": {"flexemr.engine.link"}}
    assert wrong_arrows(upward, layers, allowed) == [
        "flexemr.protocol.frames -> flexemr.engine.link: protocol is below engine"
    ]
    assert cycle(package_graph(upward)) in (
        ["engine", "protocol", "engine"],
        ["protocol", "engine", "protocol"],
    )

    unpinned = {**good, "flexemr.ranker.ranker": {"flexemr.protocol.frames", "flexemr.engine.link"}}
    assert wrong_arrows(unpinned, layers, {**allowed, "ranker": {"engine"}}) == [
        "flexemr.ranker.ranker -> flexemr.protocol.frames: not in ALLOWED['ranker']"
    ]
    unknown = {**good, "flexemr.engine.link": {"flexemr.cli.main"}}
    assert wrong_arrows(unknown, layers, allowed) == [
        "flexemr.engine.link -> flexemr.cli.main: a package missing from LAYERS"
    ]


def test_the_config_imports_nothing_of_flexemr_outside_it() -> None:
    """`flexemr.config` (the sections, their flags, the spec, the secret) may be used by any layer."""
    outside = {f"{m} -> {n}" for m, names in MODULES.items() if package(m) == "config" for n in names}
    assert {a for a in outside if not a.split(" -> ")[1].startswith("flexemr.config")} == set()


@pytest.mark.parametrize("module", ["flexemr.config", "flexemr.config.spec", "flexemr.config.security"])
def test_importing_the_config_imports_no_torch(module: str) -> None:
    """What a config file or a flag needs loads in a bare interpreter (a spec check, a CLI's --help)."""
    heavy = "{'torch', 'numpy'}"
    code = f"import sys, {module}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_batch_type_sits_below_its_users() -> None:
    """`flexemr.batch` is what clients send, workloads generate and the ranker scores: it needs
    the model's shape only, so the ranker, the APIs and the workloads can all use it."""
    assert MODULES["flexemr.batch"] == {"flexemr.model.spec"}
