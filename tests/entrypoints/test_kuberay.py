"""The KubeRay recipe (deploy/kuberay/raycluster.yaml) fits the plan of the serve command it documents:
memory nodes large enough for each embedding server's request, enough of them, a GPU per ranker, the
tested Ray version, and a Service on the rankers' port."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from flexemr.cli.options import cluster_spec
from flexemr.cli.serve import add_arguments
from flexemr.entrypoints.ray_resources import replica_groups, server_memory

yaml = pytest.importorskip("yaml", reason="PyYAML (installed with the ray extra) is not installed")

ROOT = Path(__file__).resolve().parents[2]
UNITS = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (32Gi, 500M, 4, 500m) as a number."""
    match = re.fullmatch(r"([\d.]+)(m|Ki|Mi|Gi|Ti|k|M|G)?", str(value))
    assert match, f"not a quantity: {value}"
    number, unit = float(match.group(1)), match.group(2) or ""
    return number / 1000 if unit == "m" else number * UNITS[unit]


def limits(group: dict[str, Any]) -> dict[str, Any]:
    (container,) = group["template"]["spec"]["containers"]
    result: dict[str, Any] = container["resources"]["limits"]
    assert container["resources"]["requests"] == result, "requests equal limits: Ray sees what it gets"
    return result


def test_raycluster_fits_its_serve_command() -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy/kuberay/raycluster.yaml").read_text()))
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    service = next(d for d in docs if d["kind"] == "Service")
    pinned = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert pinned and cluster["spec"]["rayVersion"] == pinned.group(1)

    command = shlex.split(cluster["metadata"]["annotations"]["flexemr.dev/serve"])
    assert command[:2] == ["flexemr", "serve"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(command[2:])
    assert args.ray == "auto"
    spec = cluster_spec(args)
    plan = spec.sharding
    need = server_memory(plan)

    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    memory_nodes = groups["memory-nodes"]
    node = limits(memory_nodes)
    usable = quantity(node["memory"]) - quantity(memory_nodes["rayStartParams"]["object-store-memory"])
    per_node = int(usable // max(need))
    assert per_node >= 1, (
        f"a memory node offers {usable / 2**30:.1f} GiB; a server needs {max(need) / 2**30:.1f}"
    )
    assert memory_nodes["replicas"] * per_node >= plan.num_servers
    assert memory_nodes["replicas"] >= max(len(g) for g in replica_groups(plan))  # STRICT_SPREAD
    assert quantity(node["cpu"]) >= per_node  # one CPU per server (RayOptions.server_cpus)

    compute = groups["compute-nodes"]
    assert compute["replicas"] >= args.ray_rankers
    if spec.ranker.device.startswith("cuda"):
        assert quantity(limits(compute)["nvidia.com/gpu"]) >= 1
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # nothing placed on the head
    assert service["spec"]["selector"]["ray.io/group"] == "compute-nodes"
    assert service["spec"]["ports"][0]["targetPort"] == spec.ranker.port
