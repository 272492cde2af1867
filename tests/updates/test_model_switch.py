"""`flexemr update --spec` follows the serving model version of a real `flexemr serve`: its
`--spec-out` file names the servers of the version serving, rewritten at each switch, so rows
pushed after a load go to the new version, and after a rollback to the old one; the version not
serving keeps its rows."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from tests.conftest import ServeProcess
from tests.ranker.test_model_versions import (
    ADMIN,
    LOAD,
    SECRET,
    SEEDS,
    reference_with,
    rows_of,
    scores_now,
    serving,
)

# Multi-process (`make test-fast` leaves them out); clusters start slowly on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "FLEXEMR_SECRET": SECRET}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[ServeProcess, Path]]:
    spec_path = tmp_path / "cluster.json"
    command = [sys.executable, "-m", "flexemr.cli.main", "serve", "--port", "0", "--watch-stdin", "--preset",
               "tiny", "--seed", str(SEEDS["1"]), "--embedding-servers", "2",
               "--spec-out", str(spec_path)]  # fmt: skip
    server = ServeProcess(command, "flexemr ready:", 240.0, ENV)
    yield server, spec_path
    server.stop()


def update_cli(spec_path: Path, rows: dict[str, np.ndarray], folder: Path, name: str) -> int:
    """`flexemr update FILE --spec SPEC` in its own process; the row version it committed."""
    path = folder / f"{name}.npz"
    np.savez(path, **rows)
    done = subprocess.run(
        [sys.executable, "-m", "flexemr.cli.main", "update", str(path), "--spec", str(spec_path)],
        capture_output=True, text=True, env=ENV, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[1].rstrip(":"))


def wait_read_version(client: httpx.Client, version: int) -> None:
    """Until the serving ranker reads at `version` (it polls its servers every 0.2 s)."""
    deadline = time.monotonic() + 60
    while client.get("/v2/stats").json()["versions"]["version"] < version:
        assert time.monotonic() < deadline, f"the ranker never read version {version}"
        time.sleep(0.05)


def assert_scores(client: httpx.Client, seed: int, updates: list[dict[str, np.ndarray]]) -> None:
    for got, want in zip(scores_now(client), reference_with(updates, seed), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_cli_updates_follow_the_serving_model_version(
    cluster: tuple[ServeProcess, Path], tmp_path: Path
) -> None:
    serve, spec_path = cluster
    with httpx.Client(base_url=serve.url, timeout=300) as client:
        assert ClusterSpec.load(spec_path).model == ModelSource(preset="tiny", seed=SEEDS["1"])
        loaded = client.post(LOAD, json={"parameters": {"seed": SEEDS["2"]}}, headers=ADMIN)
        assert loaded.status_code == 200, loaded.text
        assert serving(client) == ("2", ["1", "2"])
        assert ClusterSpec.load(spec_path).model == ModelSource(preset="tiny", seed=SEEDS["2"])

        # Pushed after the load: served exactly by version 2.
        first = rows_of(21)
        wait_read_version(client, update_cli(spec_path, first, tmp_path, "first"))
        assert_scores(client, SEEDS["2"], [first])

        # Rolled back: version 1 never got those rows; a push now goes to version 1 only.
        back = client.post(LOAD, json={"parameters": {"version": "1"}}, headers=ADMIN)
        assert back.status_code == 200 and serving(client)[0] == "1", back.text
        assert ClusterSpec.load(spec_path).model == ModelSource(preset="tiny", seed=SEEDS["1"])
        assert_scores(client, SEEDS["1"], [])
        second = rows_of(22)
        wait_read_version(client, update_cli(spec_path, second, tmp_path, "second"))
        assert_scores(client, SEEDS["1"], [second])

        # Forward again: version 2 has the first rows and not the second.
        forward = client.post(LOAD, json={"parameters": {"version": "2"}}, headers=ADMIN)
        assert forward.status_code == 200 and serving(client)[0] == "2", forward.text
        assert_scores(client, SEEDS["2"], [first])
