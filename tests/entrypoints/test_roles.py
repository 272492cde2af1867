"""`flexemr embedding-server` and `flexemr ranker` run separately from one cluster spec file."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from flexemr.client import Client, InferenceError
from flexemr.config import Endpoint, EngineConfig, RankerConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.local import LocalCluster
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.sharding.plan import make_plan
from tests.core.helpers import random_batch, reference_scores


@pytest.mark.slow
def test_ranker_role_serves_from_a_spec_file_honouring_its_engine_and_ranker_sections(tmp_path: Path) -> None:
    """The spec file's engine and ranker sections reach the ranker, and only the flags given
    override them."""
    source = ModelSource(preset="tiny", seed=9)
    spec = model_spec(source)
    plan = make_plan("table", spec.table_rows, spec.dim, 2)
    cluster_spec = ClusterSpec(source, plan, (Endpoint(), Endpoint()), RankerConfig(port=0))
    with LocalCluster(cluster_spec) as cluster:  # runs `flexemr embedding-server --spec ... --index i`
        path = tmp_path / "cluster.json"
        engine = EngineConfig(mode="shared", io_threads=3, credits="piggyback", migration=False)
        ranker_section = RankerConfig(port=0, model_name="ctr", max_batch=64)
        dataclasses.replace(cluster.spec, engine=engine, ranker=ranker_section).save(path)
        flags = ["--io-threads", "2", "--max-batch", "4"]
        ranker = subprocess.Popen(
            [sys.executable, "-m", "flexemr.cli.main", "ranker", "--spec", str(path), *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert ranker.stdout is not None
            url = None
            for line in ranker.stdout:
                match = re.search(r"ranker ready: (http://\S+) model=ctr", line)
                if match:
                    url = match.group(1)
                    break
            assert url is not None
            batch = random_batch(spec, 4, seed=1)
            with Client(url, model="ctr") as client:
                scores = client.infer(*batch)
                with pytest.raises(InferenceError, match="exceeds the maximum of 4"):
                    client.infer(*random_batch(spec, 5, seed=2))
            served_engine = httpx.get(f"{url}/v2/stats", timeout=30).json()["transport"]["engine"]
            np.testing.assert_allclose(
                scores, reference_scores(build_monolithic(load_weights(source)), *batch), atol=1e-5
            )
            assert {k: served_engine[k] for k in ("mode", "io_threads", "credits", "migration")} == {
                "mode": "shared",
                "io_threads": 2,
                "credits": "piggyback",
                "migration": False,
            }
        finally:
            ranker.terminate()
            ranker.wait(20)
            assert ranker.stdout is not None
            ranker.stdout.close()


def test_spec_file_mismatch_is_refused(tmp_path: Path) -> None:
    source = ModelSource(preset="tiny")
    spec = model_spec(source)
    plan = make_plan("row", spec.table_rows, spec.dim, 2)
    data = ClusterSpec(source, plan, (Endpoint(), Endpoint())).to_dict()
    data["embedding_servers"] = data["embedding_servers"][:1]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    result = subprocess.run(
        [sys.executable, "-m", "flexemr.cli.main", "ranker", "--spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "the plan has 2 servers but 1 embedding server endpoints are listed" in result.stderr
    assert "Traceback" not in result.stderr


PARENT = """
import sys, time
from tests.conftest import start_serve
serve = start_serve("--preset", "tiny", "--embedding-servers", "2")
print(serve.pid, *serve.children(), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_a_parent_killed_outright_leaves_no_serve_or_server_behind() -> None:
    command = [sys.executable, "-c", PARENT]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2]
    ) as parent:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 3 and all(_alive(p) for p in pids)  # serve and its two embedding servers
        parent.kill()  # SIGKILL: no cleanup runs in the parent
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)], "children outlived their parent"


def test_ranker_threads_share_the_cores_with_the_servers_beside_it() -> None:
    from flexemr.entrypoints.roles import ranker_threads

    cores = os.cpu_count() or 1
    assert ranker_threads(3, beside=5) == 3  # asked for
    assert ranker_threads(0, beside=0) == cores  # alone on its host: all of them
    assert ranker_threads(0, beside=cores) == max(1, cores // (cores + 1)) == 1
