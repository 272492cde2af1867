"""Row updates on a real cluster (embedding servers as processes on 127.0.0.1, R=2 replicas, int8,
fp32, fp16 and int4 tables): exact scores after updates, with and without the ranker's cache; every
replica updated; one version per request while updates stream; bad updates refused; a restarted
server back at its version; a repeated (source, sequence) applied once; a half-done commit healed."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import generate_latest

from flexemr.api.metrics import RequestMetrics
from flexemr.cli.main import main
from flexemr.config import CacheMode, Endpoint, RankerConfig, SecurityConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.engine import IoEngine
from flexemr.engine.link import ServerLink, links
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model import rows as stored_rows
from flexemr.model.dlrm import DLRM
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.protocol.frames import MessageType
from flexemr.protocol.updates import StagedRows
from flexemr.ranker.ranker import Ranker
from flexemr.sharding.plan import make_plan, replicated
from flexemr.transport.base import LookupFailed, SubrequestRefused
from flexemr.updates import RowUpdates, UpdateFailed, Updater
from tests.core.helpers import random_batch, reference_scores, wait_for_cached_rows
from tests.updates.helpers import apply_monolithic, random_updates, rows_of

pytestmark = pytest.mark.slow


@dataclasses.dataclass
class Live:
    spec: ClusterSpec
    cluster: LocalCluster
    rankers: list[Ranker]
    """Partial sums and no cache; raw rows into a fixed cache."""
    mono: DLRM
    """The monolithic model, given every update the cluster was given."""
    updater: Updater
    links: list[ServerLink]

    def apply(self, updates: RowUpdates) -> int:
        version = self.updater.apply(updates)
        apply_monolithic(self.mono, updates)
        return version

    def wait_for(self, version: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        for ranker in self.rankers:
            assert ranker.row_version is not None
            while ranker.row_version.version < version:
                assert time.monotonic() < deadline, (
                    f"a ranker still reads version {ranker.row_version.version}"
                )
                time.sleep(0.02)

    def check_scores(self, seed: int, batch: int = 16) -> None:
        dense, indices, lengths = random_batch(self.mono.spec, batch, seed)
        want = reference_scores(self.mono, dense, indices, lengths)
        for ranker in self.rankers:
            np.testing.assert_allclose(ranker.score(dense, indices, lengths), want, atol=1e-5)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    secret = tmp_path_factory.mktemp("secret") / "secret"
    secret.write_text("a secret of the update tests")
    source = ModelSource(preset="tiny", seed=11, row_dtype="int8,fp32,fp16,int4")
    model = model_spec(source)
    plan = replicated(make_plan("row", model.table_rows, model.dim, 2), 2)
    spec = ClusterSpec(
        source, plan, tuple(Endpoint() for _ in range(4)), security=SecurityConfig(secret_file=str(secret))
    )
    cluster = LocalCluster(spec, supervise=True)
    spec = cluster.start()
    rankers = [
        build_ranker(spec),
        build_ranker(
            dataclasses.replace(spec, ranker=RankerConfig(lookup="raw", cache=CacheMode.parse("fixed:1MiB")))
        ),
    ]
    state = Live(spec, cluster, rankers, build_monolithic(load_weights(source)), Updater(spec), links(spec))
    yield state
    state.updater.close()
    for link in state.links:
        link.close()
    for ranker in rankers:
        ranker.close()
    cluster.stop()


def _server_rows(live: Live) -> Callable[[int, np.ndarray, np.ndarray], np.ndarray]:
    """Rows (tables, rows) as server `s` holds them (float32), read from it with bags of one row."""

    def read(server: int, tables: np.ndarray, rows: np.ndarray) -> np.ndarray:
        out = []
        for t, r in zip(tables.tolist(), rows.tolist(), strict=True):
            shard = next(
                s
                for s in live.spec.sharding.shards_of(server)
                if s.table == t and s.row_start <= r < s.row_end
            )
            local = np.array([r - shard.row_start + shard.local_start], dtype=np.int64)
            answer = live.links[server].request(MessageType.LOOKUP, [local, np.zeros(1, dtype=np.int64)])
            out.append(answer.buffers[0][0])
        return np.stack(out)

    return read


def _mono_rows(mono: DLRM, tables: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.stack(
        [
            stored_rows.decode(mono.emb_l[t].weight.detach()[r : r + 1], mono.spec.formats[t]).numpy()[0]
            for t, r in zip(tables.tolist(), rows.tolist(), strict=True)
        ]
    )


def _holders(live: Live, table: int, row: int) -> list[int]:
    return [
        s.server for s in live.spec.sharding.shards if s.table == table and s.row_start <= row < s.row_end
    ]


def test_scores_are_exact_after_updates_on_every_replica(live: Live) -> None:
    live.check_scores(seed=1)
    wait_for_cached_rows(live.rankers[1].stats)
    live.check_scores(seed=1)  # the cache now holds rows of this batch
    _, indices, lengths = random_batch(live.mono.spec, 16, 1)
    tables, rows = rows_of(live.mono.spec, indices, lengths)
    values = np.random.default_rng(2).standard_normal((tables.size, live.mono.spec.dim)).astype(np.float32)
    version = live.apply(RowUpdates(tables, rows, values))
    assert version == live.updater.version() >= 1
    live.wait_for(version)
    live.check_scores(seed=1)  # no cached row serves its old value
    cache = live.rankers[1].stats()["cache"]
    assert cache["hits"] > 0 and cache["invalidated"] > 0
    read = _server_rows(live)
    for t, r in list(zip(tables.tolist(), rows.tolist(), strict=True))[:8]:
        holders = _holders(live, t, r)
        assert len(holders) == 2
        for server in holders:  # every replica holds the new row, encoded as at load
            np.testing.assert_array_equal(
                read(server, np.array([t]), np.array([r])),
                _mono_rows(live.mono, np.array([t]), np.array([r])),
            )
    assert all(link.changes(0).version == version for link in live.links)
    stats = live.rankers[0].stats()["versions"]
    assert stats["version"] == version and stats["transitions"] >= 1
    metrics = generate_latest(RequestMetrics(live.rankers[1].stats).registry).decode()
    assert f"flexemr_versions_version {version}.0" in metrics
    assert "flexemr_versions_rows_invalidated_total" in metrics
    engine = live.rankers[0].transport
    assert isinstance(engine, IoEngine)
    server = engine.server_credit_stats(0)["updates"]
    assert server["version"] == version and server["rows_applied"] >= 1


def test_every_request_reads_one_version_while_updates_stream(live: Live) -> None:
    """Readers score a fixed batch while a thread applies versions that change every row it reads,
    on every server: each score is the monolithic score at some single version."""
    dense, indices, lengths = random_batch(live.mono.spec, 8, 3)
    tables, rows = rows_of(live.mono.spec, indices, lengths)
    rng = np.random.default_rng(4)
    base = live.updater.version()
    batches = []
    expected = {base: reference_scores(live.mono, dense, indices, lengths)}
    for v in range(base + 1, base + 13):
        batches.append(RowUpdates(tables, rows, rng.standard_normal((tables.size, 8)).astype(np.float32)))
        apply_monolithic(live.mono, batches[-1])
        expected[v] = reference_scores(live.mono, dense, indices, lengths)
    done = threading.Event()
    scores: list[np.ndarray] = []
    failures: list[Exception] = []

    def read(ranker: Ranker) -> None:
        while not done.is_set():
            try:
                scores.append(ranker.score(dense, indices, lengths))
            except LookupFailed as exc:  # the version moved under it too often: refused, never mixed
                failures.append(exc)

    readers = [threading.Thread(target=read, args=(r,)) for r in live.rankers for _ in range(2)]
    for thread in readers:
        thread.start()
    try:
        for batch in batches:
            live.updater.apply(batch)
            time.sleep(0.05)
    finally:
        done.set()
        for thread in readers:
            thread.join(60)
    seen = set()
    for got in scores:
        match = [v for v, want in expected.items() if np.allclose(got, want, atol=1e-5, rtol=0)]
        assert match, f"a score no single version gives: {got}"
        seen.update(match)
    assert len(seen) > 1 and len(scores) > 20 and len(failures) < len(scores)
    live.wait_for(base + 12)
    live.check_scores(seed=3, batch=8)


def test_bad_updates_are_refused_and_change_nothing(live: Live, tmp_path: Path) -> None:
    spec = live.mono.spec
    version = live.updater.version()
    good = random_updates(spec, 4, 5)
    cases = {
        "table 9": dataclasses.replace(good, tables=np.array([9, 0, 1, 2])),
        "row 100 is outside table 0": dataclasses.replace(good, rows=np.array([100, 0, 0, 0])),
        r"values must be \[4, 8\]": dataclasses.replace(good, values=good.values[:, :4]),
        "finite": dataclasses.replace(good, values=np.full_like(good.values, np.nan)),
    }
    for message, bad in cases.items():
        with pytest.raises(ValueError, match=message):
            live.updater.apply(bad)
    # A server checks for itself what a client without these checks sends.
    outside = StagedRows(version + 1, 1, np.array([10**6]), np.zeros((1, 8), np.float32))
    with pytest.raises(SubrequestRefused, match="outside this server"):
        live.links[0].request(MessageType.UPDATE, outside.buffers())
    infinite = StagedRows(version + 1, 1, np.array([0]), np.full((1, 8), np.inf, np.float32))
    with pytest.raises(SubrequestRefused, match="finite"):
        live.links[0].request(MessageType.UPDATE, infinite.buffers())
    wrong = tmp_path / "wrong"
    wrong.write_text("not the secret")
    intruder = Updater(dataclasses.replace(live.spec, security=SecurityConfig(secret_file=str(wrong))))
    try:
        with pytest.raises(UpdateFailed):
            intruder.apply(good)
    finally:
        intruder.close()
    assert [link.changes(0).version for link in live.links] == [version] * 4
    live.check_scores(seed=6)


def test_a_repeated_sequence_is_applied_once(live: Live) -> None:
    first = random_updates(live.mono.spec, 12, 7, source="trainer", sequence=41)
    live.apply(first)
    again = dataclasses.replace(first, values=first.values + 1)
    version = live.updater.apply(again)  # acknowledged, not applied (the monolithic model skips it too)
    live.wait_for(version)
    read = _server_rows(live)
    for server in _holders(live, int(first.tables[0]), int(first.rows[0])):
        np.testing.assert_array_equal(
            read(server, first.tables[:1], first.rows[:1]),
            _mono_rows(live.mono, first.tables[:1], first.rows[:1]),
        )
    live.check_scores(seed=8)


def test_a_commit_left_half_done_is_finished_by_the_rankers(live: Live) -> None:
    """A committer that died after server 0 committed: the version is decided; rankers commit it
    on the other servers when they meet them behind, and score it."""
    updates = random_updates(live.mono.spec, 16, 9)
    version, token = live.updater.version() + 1, 12345
    split = live.updater._split(updates)
    written = np.array([split[s][0].size if s in split else 0 for s in range(4)])
    empty = (np.empty(0, np.int64), np.empty((0, 8), np.float32))
    for server in sorted({0, *split}):
        rows, values = split.get(server, empty)
        live.links[server].stage(StagedRows(version, token, rows, values))
    live.links[0].commit(version, token, written)
    apply_monolithic(live.mono, updates)
    live.wait_for(version)
    live.check_scores(seed=10)
    assert [link.changes(0).version for link in live.links] == [version] * 4


def test_a_restarted_server_comes_back_at_its_version(live: Live) -> None:
    version = live.apply(random_updates(live.mono.spec, 20, 11))
    live.wait_for(version)
    updates = random_updates(live.mono.spec, 20, 12)
    tables, rows = updates.tables, updates.rows
    restarts = live.cluster.restarts
    live.cluster.kill_server(1)
    deadline = time.monotonic() + 120
    while live.cluster.restarts == restarts or not all(r.ready() for r in live.rankers):
        assert time.monotonic() < deadline, "the server did not come back"
        time.sleep(0.1)
    assert live.links[1].changes(0).version == version
    mine = np.array([1 in _holders(live, t, r) for t, r in zip(tables.tolist(), rows.tolist(), strict=True)])
    np.testing.assert_array_equal(
        _server_rows(live)(1, tables[mine], rows[mine]), _mono_rows(live.mono, tables[mine], rows[mine])
    )
    live.check_scores(seed=13)


def test_flexemr_update_applies_a_file(
    live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    updates = random_updates(live.mono.spec, 10, 14)
    path = tmp_path / "rows.pt"
    torch.save({"table": torch.from_numpy(updates.tables), "row": torch.from_numpy(updates.rows),
                "values": torch.from_numpy(updates.values)}, path)  # fmt: skip
    spec_path = tmp_path / "cluster.json"
    live.spec.save(spec_path)
    assert main(["update", str(path), "--spec", str(spec_path)]) == 0
    apply_monolithic(live.mono, updates)
    version = live.updater.version()
    assert capsys.readouterr().out.startswith(f"version {version}:")
    live.wait_for(version)
    live.check_scores(seed=15)
    # The same from Parquet, as a trainer's pipeline writes it: a list of dim floats per row.
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    again = random_updates(live.mono.spec, 10, 16)
    values = pa.FixedSizeListArray.from_arrays(pa.array(again.values.ravel()), live.mono.spec.dim)
    table = pa.table({"table": again.tables, "row": again.rows, "values": values})
    pq.write_table(table, tmp_path / "rows.parquet")
    assert main(["update", str(tmp_path / "rows.parquet"), "--spec", str(spec_path)]) == 0
    apply_monolithic(live.mono, again)
    capsys.readouterr()
    live.wait_for(live.updater.version())
    live.check_scores(seed=17)
    ragged = pa.table({"table": [0, 0], "row": [1, 2], "values": [[1.0] * live.mono.spec.dim, [1.0]]})
    pq.write_table(ragged, tmp_path / "ragged.parquet")
    assert main(["update", str(tmp_path / "ragged.parquet"), "--spec", str(spec_path)]) == 2
    assert "same length" in capsys.readouterr().err
    np.savez(tmp_path / "bad.npz", table=updates.tables, row=updates.rows)
    bad_file = str(tmp_path / "bad.npz")
    assert main(["update", bad_file, "--spec", str(spec_path)]) == 2
    assert "missing array(s) values" in capsys.readouterr().err
