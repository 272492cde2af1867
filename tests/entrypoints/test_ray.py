"""`flexemr serve --ray`: a real local Ray cluster (a head and three worker nodes, each offering memory
for one embedding server), servers placed by memory on distinct nodes, exact scores, and a node's
death survived: Ray restarts its server elsewhere and the ranker follows it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from flexemr.client import Client
from flexemr.config import Endpoint, RankerConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.ray_resources import server_memory
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.sharding.plan import make_plan
from tests.conftest import start_serve
from tests.core.helpers import random_batch, reference_scores

LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Off: Ray keeps every address on 127.0.0.1 (else it swaps loopback for the machine's address). Read
# when Ray is imported; inherited by Ray's processes and by `flexemr serve`.
os.environ[LOOPBACK] = "0"
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'flexemr[ray]')")
from ray.cluster_utils import Cluster  # noqa: E402

from flexemr.entrypoints.ray_cluster import RayDeployment, RayOptions  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # a Ray cluster of four nodes
SOURCE = ModelSource(preset="tiny", seed=5)
PLAN = make_plan("row", model_spec(SOURCE).table_rows, model_spec(SOURCE).dim, 2)
SPEC = ClusterSpec(SOURCE, PLAN, (Endpoint(), Endpoint()), ranker=RankerConfig(port=0))
NODE = {"num_cpus": 1, "object_store_memory": 80 * 2**20, "node_ip_address": "127.0.0.1"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Three worker nodes, each with memory for one server but not two; the head has none."""
    node_memory = int(max(server_memory(PLAN)) * 1.5)
    head = {**NODE, "memory": 2**20, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(3):  # two CPUs: a ranker and a server may share the spare node
            cluster.add_node(**{**NODE, "num_cpus": 2}, memory=node_memory)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="flexemr", log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def assert_exact(url: str, seeds: range = range(3)) -> None:
    monolithic = build_monolithic(load_weights(SOURCE))
    with Client(url) as client:
        for seed in seeds:
            dense, indices, lengths = random_batch(model_spec(SOURCE), 16, seed)
            np.testing.assert_allclose(
                client.infer(dense, indices, lengths),
                reference_scores(monolithic, dense, indices, lengths),
                atol=1e-5,
            )


def wait_for(check: Callable[[], bool], timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def test_servers_placed_by_memory_serve_exact_and_come_back(cluster: Cluster) -> None:
    deployment = RayDeployment(SPEC, RayOptions(address=cluster.address, env={"FLEXEMR_TEST_ENV": "s3cret"}))
    try:
        (url,) = deployment.start()
        nodes = deployment.server_nodes()
        assert len(set(nodes)) == 2, "each node has memory for one server only"
        head = cluster.head_node.node_id
        assert head not in nodes
        env = ray.get(deployment.servers[0].__ray_call__.remote(lambda _: os.environ.get("FLEXEMR_TEST_ENV")))
        assert env == "s3cret"
        assert_exact(url)

        # the node of a server (not the ranker's: the ranker's URL must outlive it) dies: Ray places
        # its bundle on the spare node and restarts the server there
        ranker_node = ray.get(
            deployment.rankers[0].__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id())
        )
        victim = next(i for i, node in enumerate(nodes) if node != ranker_node)
        dead = next(n for n in cluster.worker_nodes if n.node_id == nodes[victim])
        cluster.remove_node(dead)

        def moved() -> bool:
            try:
                return deployment.server_nodes()[victim] not in nodes
            except ray.exceptions.RayError:  # restarting: calls fail until it runs again
                return False

        wait_for(moved)
        with Client(url) as client:
            wait_for(client.ready)
        assert_exact(url, range(3, 6))
    finally:
        deployment.stop()


def test_serve_on_an_existing_ray_cluster(cluster: Cluster) -> None:
    serve = start_serve(
        "--ray", cluster.address, "--preset", "tiny", "--seed", "5", "--embedding-servers", "2",
        "--sharding", "row", "--host", "127.0.0.1", timeout=240,
    )  # fmt: skip
    try:
        assert "tier=ray" in "".join(serve.output)
        assert_exact(serve.url)
    finally:
        serve.stop()
    assert serve.proc.returncode == 0
