"""`flexemr serve --ray` across hosts: a Ray head and three worker nodes, each in its own network
namespace (veth links, no shared loopback), started with the `ray` CLI as on separate machines.

    head  (no CPUs, no memory: nothing placed on it; the driver, `flexemr serve --ray`, runs here)
    mem0, mem1  (memory for two embedding servers each, not three)
    rank  (CPUs, too little memory for a server: the ranker)
    client  (no Ray: the test's requests)

Servers land by memory on the memory nodes (the copies of a shard on distinct ones), the ranker on
the compute node; scores are exact; a server actor killed under load fails no request, Ray restarts it
and the ranker follows it to its new port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from flexemr.client import Client
from flexemr.config.model import ModelSource
from flexemr.entrypoints.child import AnnouncedProcess
from flexemr.entrypoints.netns import NetnsBed
from flexemr.entrypoints.ray_resources import server_memory
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.sharding.plan import make_plan, replicated
from tests.core.helpers import random_batch, reference_scores
from tests.entrypoints.helpers import ENV, FLEXEMR, netns_bed
from tests.ranker.test_replicas import Load, _ready, _subrequests, _wait_until

pytest.importorskip("ray", reason="Ray is not installed (pip install 'flexemr[ray]')")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
RAY = str(Path(sys.executable).with_name("ray"))
GCS_PORT = "6379"  # inside the bed's own namespaces: nothing else listens there
SOURCE = ModelSource(preset="tiny", seed=3)  # as tests.ranker.test_replicas' Load expects
PLAN = replicated(make_plan("row", model_spec(SOURCE).table_rows, model_spec(SOURCE).dim, 2), 2)
SERVER_BYTES = max(server_memory(PLAN))
# Ray's processes see none of the test's environment: no secret (the driver hands its own to the
# actors) and none of Ray's settings from other tests. Ray's token auth is off on both sides: a node
# started by `ray start` turns it on when ~/.ray/auth_token exists (any local `ray.init()`, e.g.
# `serve --ray local`, writes one), while a driver joining by address turns it on only when told.
NO_RAY_AUTH = {"RAY_AUTH_MODE": "disabled"}
RAY_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "FLEXEMR_"))} | NO_RAY_AUTH


def start_ray_node(bed: NetnsBed, host: str, temp_dir: str, *args: str) -> None:
    """`ray start` in `host`, on its veth address; `--block` keeps it a child the bed reaps. Each node
    gets its own temp dir: nodes sharing one (the head's, by default) bind their Unix sockets at the
    same paths there, and all but the first raylet die with `bind: Address already in use`."""
    with Path(temp_dir, f"{host}.log").open("w") as log:
        bed.popen(
            host,
            [RAY, "start", "--block", f"--node-ip-address={bed.addresses[host]}",
             f"--temp-dir={temp_dir}/{host}", "--disable-usage-stats", "--object-store-memory=80000000",
             *args],
            env=RAY_ENV, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def actors(bed: NetnsBed, host: str, name: str) -> list[int]:
    """Pids of the Ray actor processes of class `name` in `host` (Ray titles them `ray::Class...`)."""
    found = []
    for pid in bed.pids(host):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(f"ray::{name}".encode()):
                found.append(pid)
        except FileNotFoundError:
            continue
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[NetnsBed, str]]:
    """The bed, its Ray cluster and `flexemr serve --ray` (two row shards, two replicas each)."""
    bed = netns_bed(["head", "mem0", "mem1", "rank", "client"])
    with tempfile.TemporaryDirectory(prefix="fxray") as temp, bed:  # short: Ray's sockets live under it
        head = f"{bed.addresses['head']}:{GCS_PORT}"
        start_ray_node(bed, "head", temp, "--head", f"--port={GCS_PORT}", "--num-cpus=0", "--memory=1",
                       "--include-dashboard=false")  # fmt: skip
        workers = {"mem0": SERVER_BYTES * 5 // 2, "mem1": SERVER_BYTES * 5 // 2, "rank": SERVER_BYTES // 2}
        for host, memory in workers.items():
            start_ray_node(bed, host, temp, f"--address={head}", "--num-cpus=2", f"--memory={memory}")
        command = bed.command(
            "head",
            [*FLEXEMR, "serve", "--ray", head, "--preset", "tiny", "--seed", "3", "--embedding-servers", "2",
             "--sharding", "row", "--replicas", "2", "--cache", "off", "--port", "8000", "--watch-stdin"],
        )  # fmt: skip
        with AnnouncedProcess(command, "flexemr ready:", 400, ENV | NO_RAY_AUTH) as serve:
            yield bed, serve.url


def servers(url: str) -> list[dict[str, object]]:
    """The ranker's view of its servers (call from inside the client host)."""
    with httpx.Client(base_url=url, timeout=60) as client:
        found: list[dict[str, object]] = client.get("/v2/stats").json()["transport"]["servers"]
    return found


def test_servers_placed_by_memory_across_namespaces_serve_exact(cluster: tuple[NetnsBed, str]) -> None:
    bed, url = cluster
    ip = bed.addresses
    assert url == f"http://{ip['rank']}:8000"
    placed = [len(actors(bed, h, "EmbeddingServerActor")) for h in ("head", "mem0", "mem1", "rank")]
    assert placed == [0, 2, 2, 0]
    assert len(actors(bed, "rank", "RankerActor")) == 1
    monolithic = build_monolithic(load_weights(SOURCE))
    with bed.entered("client"):
        hosts = [str(s["endpoint"]).rsplit(":", 1)[0] for s in servers(url)]
        assert set(hosts) == {ip["mem0"], ip["mem1"]}
        assert hosts[0] != hosts[2] and hosts[1] != hosts[3]  # servers i and i + 2 hold the same rows
        with Client(url) as client:
            for seed, batch in enumerate([1, 16, 64]):
                dense, indices, lengths = random_batch(model_spec(SOURCE), batch, seed)
                np.testing.assert_allclose(
                    client.infer(dense, indices, lengths),
                    reference_scores(monolithic, dense, indices, lengths),
                    atol=1e-5,
                )


def test_a_server_actor_killed_under_load_fails_nothing_and_rejoins(cluster: tuple[NetnsBed, str]) -> None:
    bed, url = cluster
    victim = actors(bed, "mem0", "EmbeddingServerActor")[0]
    with bed.entered("client"):  # the load's threads start in here, so they live here too
        before = [s["endpoint"] for s in servers(url)]
        loads = [Load(url, 60) for _ in range(2)]
        loads[0].wait_for(15)
        os.kill(victim, signal.SIGKILL)
        for load in loads:
            load.join()
            assert load.statuses == [200] * 60 and load.wrong == 0, load.errors

        # Ray restarts the actor on its node (its placement group's bundle is there); it listens on a
        # new port, and the ranker's follower points the engine there
        def restarted() -> bool:
            now = actors(bed, "mem0", "EmbeddingServerActor")
            return len(now) == 2 and victim not in now

        def moved() -> list[int]:
            return [i for i, s in enumerate(servers(url)) if s["endpoint"] != before[i]]

        _wait_until(restarted, "Ray restarts the killed actor", 240)
        _wait_until(lambda: len(moved()) == 1, "the ranker follows the restarted server to its new port")
        (index,) = moved()
        assert str(servers(url)[index]["endpoint"]).startswith(f"{bed.addresses['mem0']}:")
        with httpx.Client(base_url=url, timeout=60) as client:
            _wait_until(lambda: not _ready(client)["degraded"], "the restarted server is re-admitted")
            counts = _subrequests(client)
            again = Load(url, 40)
            again.join()
            assert again.statuses == [200] * 40 and again.wrong == 0, again.errors
            assert _subrequests(client)[index] > counts[index], "the restarted server takes lookups again"
