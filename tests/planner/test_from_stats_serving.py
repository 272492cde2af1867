"""Measured traffic to a served plan, over real processes: servers count what they look up, `plan
--from-stats URL` gives the hot range more copies, `serve --plan` scores exactly with it, and a
server holding a copy of the hot range is killed under load without a failed or wrong answer."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from flexemr.cli.main import main
from flexemr.config.model import ModelSource
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.planner import load_sharding
from tests.api.test_http import infer_body
from tests.conftest import ServeProcess
from tests.core.helpers import random_batch, reference_scores

SOURCE = ModelSource(preset="tiny", seed=3)
SPEC = model_spec(SOURCE)  # tables of 100, 50, 200, 30 rows: one row per grid range
HOT_ROW = 7
"""Table 0's hot row: half of table 0's lookups."""


def skewed_batch(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    dense, indices, lengths = random_batch(SPEC, 16, seed)
    in_table_0 = int(lengths.reshape(SPEC.num_tables, -1)[0].sum())
    indices[:in_table_0:2] = HOT_ROW
    return dense, indices, lengths


def server_index(pid: int) -> int:
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return int(args[args.index(b"--index") + 1])


def scores(client: httpx.Client, batch: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[int, np.ndarray]:
    response = client.post("/v2/models/dlrm/infer", json=infer_body(*batch))
    if response.status_code != 200:
        return response.status_code, np.zeros(0)
    return 200, np.array(response.json()["outputs"][0]["data"], dtype=np.float32)


def hot_holders(plan_path: Path) -> list[int]:
    plan = load_sharding(plan_path)
    return sorted(s.server for s in plan.shards if s.table == 0 and s.row_start <= HOT_ROW < s.row_end)


@pytest.mark.slow
def test_servers_count_what_they_look_up_and_plan_from_stats_reads_the_rankers_url(
    serve: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    batches = [skewed_batch(seed) for seed in range(6)]
    # --range-sample 1: every lookup counted, exactly
    measured = serve("--preset", "tiny", "--seed", "3", "--embedding-servers", "3", "--sharding", "row",
                     "--cache", "off", "--range-sample", "1")  # fmt: skip
    with httpx.Client(base_url=measured.url, timeout=60) as client:
        for batch in batches:
            assert scores(client, batch)[0] == 200
        stats = client.get("/v2/stats/ranges").json()
    assert stats["missing"] == [] and stats["range_rows"] == [1, 1, 1, 1]
    per_row = [np.zeros(rows, dtype=np.int64) for rows in SPEC.table_rows]
    for table, start, end, n in stats["ranges"]:
        assert end - start == 1  # one row per range in tables this small
        per_row[table][start] += n
    sent = [np.zeros(rows, dtype=np.int64) for rows in SPEC.table_rows]
    for _, indices, lengths in batches:
        bounds = np.concatenate([[0], np.cumsum(lengths.reshape(SPEC.num_tables, -1).sum(axis=1))])
        for t in range(SPEC.num_tables):
            sent[t] += np.bincount(indices[bounds[t] : bounds[t + 1]], minlength=SPEC.table_rows[t])
    for t in range(SPEC.num_tables):
        np.testing.assert_array_equal(per_row[t], sent[t])
    assert sum(stats["lookups"]) == sum(int(s.sum()) for s in sent) and stats["sample"] == [1, 1, 1]

    # two copies of every row, the hot row on all three servers
    plan_path = tmp_path / "hot.json"
    args = ["plan", "--from-stats", f"{measured.url}/v2/stats/ranges", "--embedding-servers", "3"]
    assert main([*args, "--availability", "1", "--memory-budget", "2.1", "--out", str(plan_path)]) == 0
    plan = load_sharding(plan_path)
    assert plan.replicas == 2 and plan.strategy == "hot-range"
    assert hot_holders(plan_path) == [0, 1, 2]
    assert max(c for t in range(SPEC.num_tables) for *_, c in plan.copies(t)) == 3


@pytest.mark.slow
def test_a_hot_range_plan_scores_exactly_and_survives_killing_a_hot_copys_server(
    serve: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    monolith = build_monolithic(load_weights(SOURCE))
    batches = [skewed_batch(seed) for seed in range(6)]
    expected = [reference_scores(monolith, *batch) for batch in batches]
    stats, plan_path = tmp_path / "stats.json", tmp_path / "hot.json"
    ranges = [[t, row, row + 1, 1] for t, rows in enumerate(SPEC.table_rows) for row in range(rows)]
    ranges.append([0, HOT_ROW, HOT_ROW + 1, 500])
    shape = {"table_rows": list(SPEC.table_rows), "dim": SPEC.dim, "range_rows": [1] * 4, "missing": []}
    stats.write_text(json.dumps({**shape, "ranges": ranges}))
    args = ["plan", "--from-stats", str(stats), "--embedding-servers", "3", "--availability", "1"]
    assert main([*args, "--memory-budget", "2.1", "--out", str(plan_path)]) == 0
    holders = hot_holders(plan_path)
    assert holders == [0, 1, 2]

    served = serve("--preset", "tiny", "--seed", "3", "--plan", str(plan_path), "--cache", "off")
    with httpx.Client(base_url=served.url, timeout=60) as client:
        for batch, want in zip(batches, expected, strict=True):
            status, got = scores(client, batch)
            assert status == 200
            np.testing.assert_allclose(got, want, atol=1e-5)
        victim = next(pid for pid in served.children() if server_index(pid) == holders[0])
        os.kill(victim, signal.SIGKILL)
        for round_ in range(3):
            for batch, want in zip(batches, expected, strict=True):
                status, got = scores(client, batch)
                assert status == 200, f"round {round_}: {status}"
                np.testing.assert_allclose(got, want, atol=1e-5)
        assert "flexemr_failovers" in client.get("/metrics").text
