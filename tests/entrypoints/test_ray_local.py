"""`flexemr serve --ray local` as a user runs it: a private Ray on this machine, sized to fit it (on a
2-core machine two servers and a ranker ask for 2/3 CPU each, not 1 that would leave the ranker
unplaced), exact scores, and a clean stop that leaves no Ray process behind."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flexemr.client import Client
from flexemr.config.model import ModelSource
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from tests.conftest import ServeProcess
from tests.core.helpers import random_batch, reference_scores

pytest.importorskip("ray", reason="Ray is not installed (pip install 'flexemr[ray]')")
from flexemr.entrypoints.ray_cluster import RayOptions, fit_cpus

SOURCE = ModelSource(preset="tiny", seed=3)


def test_requests_are_scaled_to_fit_the_cpus_of_a_private_ray() -> None:
    fitted = fit_cpus(RayOptions(), servers=2, cpus=2.0)
    assert 2 * fitted.server_cpus + fitted.ranker_cpus <= 2.0
    assert fitted.server_cpus == fitted.ranker_cpus > 0.66
    assert fit_cpus(RayOptions(rankers=2), servers=4, cpus=16.0) == RayOptions(rankers=2)  # room: as asked


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (Ray's GCS, raylet and workers under the driver)."""
    found, todo = set(), [pid]
    while todo:
        for path in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                children = {int(p) for p in path.read_text().split()}
                todo.extend(children - found)
                found |= children
    return found


def alive(pids: set[int]) -> set[int]:
    return {p for p in pids if Path(f"/proc/{p}").exists() and "zombie" not in _state(p)}


def _state(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    return "zombie"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serve_ray_local_serves_exact_scores_and_stops_cleanly() -> None:
    command = [sys.executable, "-m", "flexemr.cli.main", "serve", "--ray", "local", "--preset", "tiny",
               "--seed", "3", "--embedding-servers", "2", "--port", "0", "--watch-stdin"]  # fmt: skip
    # Off: Ray keeps its addresses on 127.0.0.1 (else it swaps loopback for the machine's address).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    serve = ServeProcess(command, "flexemr ready:", 300.0, env)
    try:
        # its own Ray, even where another runs on this machine (a plain ray.init() would join that one)
        assert any("Started a local Ray instance" in line for line in serve.output), "".join(serve.output)
        ray_processes = descendants(serve.pid)
        assert ray_processes, "no Ray processes under the driver"
        dense, indices, lengths = random_batch(model_spec(SOURCE), 16, seed=1)
        with Client(serve.url) as client:
            scores = client.infer(dense, indices, lengths)
        expected = reference_scores(build_monolithic(load_weights(SOURCE)), dense, indices, lengths)
        np.testing.assert_allclose(scores, expected, atol=1e-5)
    finally:
        serve.stop()
    assert serve.proc.returncode == 0, "".join(serve.output[-40:])
    deadline = time.monotonic() + 60
    while alive(ray_processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert alive(ray_processes) == set(), "Ray processes outlived flexemr serve --ray local"
