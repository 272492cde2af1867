"""`ServingUpdater` applies an update to the servers its spec file names; when the file is rewritten
while it applies (a model switch), it applies the same (source, sequence) to the new servers too."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from flexemr.config import Endpoint
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.model.source import model_spec
from flexemr.sharding.plan import make_plan
from flexemr.updates import RowUpdates, serving_updater
from flexemr.updates.serving_updater import ServingUpdater

SOURCE = ModelSource(preset="tiny", seed=3)
MODEL = model_spec(SOURCE)


def cluster(port: int) -> ClusterSpec:
    plan = make_plan("table", MODEL.table_rows, MODEL.dim, 2)
    return ClusterSpec(SOURCE, plan, (Endpoint("127.0.0.1", port), Endpoint("127.0.0.1", port + 1)))


APPLIED: list[tuple[int, str, int | None]] = []
"""(server 0's port, source, sequence) of each update a `FakeUpdater` applied."""
DURING: list[Callable[[], None]] = []
"""Run inside the next apply (a switch meanwhile)."""


class FakeUpdater:
    def __init__(self, spec: ClusterSpec) -> None:
        self.spec, self.model = spec, MODEL

    def apply(self, updates: RowUpdates) -> int:
        APPLIED.append((self.spec.embedding_servers[0].port, updates.source, updates.sequence))
        while DURING:
            DURING.pop()()
        return len(APPLIED)

    def close(self) -> None:
        pass


def test_a_switch_during_an_update_applies_it_to_the_new_servers_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serving_updater, "Updater", FakeUpdater)
    APPLIED.clear()
    path = tmp_path / "cluster.json"
    cluster(1000).save(path)
    updater = ServingUpdater(path)
    rows = RowUpdates(np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros((1, MODEL.dim), np.float32))

    assert updater.apply(rows) == 1  # no switch: once
    DURING.append(lambda: cluster(2000).save(path))
    assert updater.apply(rows) == 3  # the version about to serve has it too
    assert updater.apply(rows) == 4
    updater.close()

    ports = [port for port, _, _ in APPLIED]
    assert ports == [1000, 1000, 2000, 2000]
    pairs = [(source, sequence) for _, source, sequence in APPLIED]
    assert pairs[1] == pairs[2] and pairs[0] != pairs[1] != pairs[3]  # one (source, sequence) per update
    assert all(sequence is not None for _, sequence in pairs)
