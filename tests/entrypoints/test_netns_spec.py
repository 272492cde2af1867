"""`flexemr spec` describes a cluster across hosts without starting it; served from network namespaces
(servers on two hosts, the ranker on a third, the client on a fourth), its scores are exact, and with
two replicas a memory host's death under load fails no request."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from flexemr.cli.main import main
from flexemr.client import Client
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.child import AnnouncedProcess
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from tests.core.helpers import random_batch, reference_scores
from tests.entrypoints.helpers import ENV, FLEXEMR, netns_bed, start_servers
from tests.ranker.test_replicas import Load, _ready, _wait_until


def test_spec_places_servers_on_hosts_without_starting_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["spec", "--preset", "tiny", "--embedding-servers", "3", "--sharding", "row",
                 "--server-hosts", "mem-a,mem-b", "--server-port", "7000", "--host", "rank-a",
                 "--port", "8000"]) == 0  # fmt: skip
    spec = ClusterSpec.from_dict(json.loads(capsys.readouterr().out))
    assert [str(e) for e in spec.embedding_servers] == ["mem-a:7000", "mem-b:7000", "mem-a:7001"]
    assert (spec.ranker.host, spec.ranker.port) == ("rank-a", 8000)


def test_spec_puts_replicas_on_distinct_hosts(capsys: pytest.CaptureFixture[str]) -> None:
    command = ["spec", "--preset", "tiny", "--embedding-servers", "2", "--replicas"]
    assert main([*command, "2", "--server-hosts", "a,b"]) == 0
    spec = ClusterSpec.from_dict(json.loads(capsys.readouterr().out))
    # servers i and i + 2 hold the same rows (replicated plan): never on one host
    assert [str(e) for e in spec.embedding_servers] == ["a:7000", "a:7001", "b:7000", "b:7001"]
    assert main([*command, "3", "--server-hosts", "a,b"]) == 2
    assert "at least 3 server hosts" in capsys.readouterr().err


def test_spec_rejects_no_hosts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["spec", "--preset", "tiny", "--server-hosts", ","]) == 2
    assert "--server-hosts" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_spec_serves_exact_scores_across_namespaces(tmp_path: object) -> None:
    bed = netns_bed(["mem0", "mem1", "rank", "client"])
    with bed:
        spec_path = f"{tmp_path}/cluster.json"
        ip = bed.addresses
        assert main(["spec", "--preset", "tiny", "--seed", "3", "--embedding-servers", "3",
                     "--sharding", "row", "--server-hosts", f"{ip['mem0']},{ip['mem1']}",
                     "--server-port", "7000", "--host", ip["rank"], "--port", "8000",
                     "--out", spec_path]) == 0  # fmt: skip
        servers = start_servers(bed, spec_path, ["mem0", "mem1", "mem0"])
        ranker_cmd = bed.command("rank", [*FLEXEMR, "ranker", "--spec", spec_path, "--watch-stdin"])
        try:
            with AnnouncedProcess(ranker_cmd, "flexemr ranker ready:", 120, ENV) as ranker:
                assert ranker.url == f"http://{ip['rank']}:8000"
                monolithic = build_monolithic(load_weights(ModelSource(preset="tiny", seed=3)))
                spec = ClusterSpec.load(spec_path)
                with bed.entered("client"), Client(ranker.url) as client:
                    assert client.ready()
                    for seed, batch in enumerate([1, 7, 64]):
                        dense, indices, lengths = random_batch(model_spec(spec.model), batch, seed)
                        np.testing.assert_allclose(
                            client.infer(dense, indices, lengths),
                            reference_scores(monolithic, dense, indices, lengths),
                            atol=1e-5,
                        )
        finally:
            for proc in servers:
                proc.terminate()
                proc.wait(30)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_replicas_survive_a_memory_hosts_death_under_load(tmp_path: object) -> None:
    """Each memory host holds one copy of every shard; killing every process on one of them while two
    clients send requests fails none of them, and every score stays exact."""
    bed = netns_bed(["mem0", "mem1", "rank", "client"])
    with bed:
        spec_path = f"{tmp_path}/cluster.json"
        ip = bed.addresses
        assert main(["spec", "--preset", "tiny", "--seed", "3", "--embedding-servers", "2",
                     "--sharding", "row", "--replicas", "2", "--server-hosts", f"{ip['mem0']},{ip['mem1']}",
                     "--host", ip["rank"], "--port", "8000", "--cache", "off",
                     "--out", spec_path]) == 0  # fmt: skip
        hosts = {ip[h]: h for h in ("mem0", "mem1")}
        start_servers(bed, spec_path, [hosts[e.host] for e in ClusterSpec.load(spec_path).embedding_servers])
        ranker_cmd = bed.command("rank", [*FLEXEMR, "ranker", "--spec", spec_path, "--watch-stdin"])
        # the load's threads start inside the client host, so they live there too
        with AnnouncedProcess(ranker_cmd, "flexemr ranker ready:", 120, ENV) as ranker, bed.entered("client"):
            loads = [Load(ranker.url, 60) for _ in range(2)]
            loads[0].wait_for(15)
            bed.kill_host("mem0")
            for load in loads:
                load.join()
                assert load.statuses == [200] * 60 and load.wrong == 0, load.errors
            with httpx.Client(base_url=ranker.url, timeout=60) as client:
                _wait_until(lambda: _ready(client)["degraded"], "the dead host's servers show as down")
                assert len(_ready(client)["servers_down"]) == 2
