"""A server's resync without a network (issue #27 items 3 and 4): server 0, a replica and a server
that lost its log or fell behind the decided versions, as `RowVersions` in one process; their
ROWS answers go through the wire format. Rows in int8, fp32 and fp16 (several segments)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from flexemr.config import FrameLimits
from flexemr.config.model import ModelSource
from flexemr.embedding_server import versions as versions_module
from flexemr.embedding_server.resync import Resync
from flexemr.embedding_server.store import ShardStore
from flexemr.embedding_server.versions import RowVersions, StaleVersion
from flexemr.model.source import load_weights
from flexemr.protocol.answers import Stale
from flexemr.protocol.frames import read_frame
from flexemr.protocol.updates import Changes, RowsCopy, StagedRows
from flexemr.sharding.plan import make_plan

SOURCE = ModelSource(preset="tiny", seed=5, row_dtype="int8,fp32,fp16,int8")


def _store(server: int) -> ShardStore:
    source = load_weights(SOURCE)
    plan = make_plan("row", source.spec.table_rows, source.spec.dim, 2)
    return ShardStore(plan, server, source, progress=False)


class Peer:
    """A server as its link shows it: answers through the wire format, STALE as `Stale`."""

    def __init__(self, versions: RowVersions, before_rows: Callable[[], None] = lambda: None) -> None:
        self.versions = versions
        self.server = versions.store.server
        self.before_rows = before_rows
        self.copied = 0

    def changes(self, since: int) -> Changes:
        return self.versions.changes(since)

    def close(self) -> None:
        pass

    def rows(self, version: int, start: int, stop: int) -> RowsCopy:
        self.before_rows()
        try:
            copy = self.versions.rows_at(version, start, stop)
        except StaleVersion as exc:
            raise Stale(self.server, exc.version) from None
        wire = io.BytesIO(b"".join(copy.frame(1)))
        self.copied += 1
        return RowsCopy.parse(read_frame(wire.readinto, FrameLimits()))


class Cluster:
    """Server 0 (rows of its own), server 1 and its replica (the same shard): every update
    writes rows of server 1 on both replicas, as the updater does (or none, while one is down)."""

    def __init__(self, tmp: Path, max_decided_versions: int = 1 << 18) -> None:
        self.tmp = tmp
        self.bounds = {"max_decided_versions": max_decided_versions}
        self.decider = RowVersions(_store(0), tmp / "log0", **self.bounds)  # type: ignore[arg-type]
        self.replica = RowVersions(_store(1), tmp / "replica", **self.bounds)  # type: ignore[arg-type]
        self.joiner = self.open_joiner()

    def open_joiner(self) -> RowVersions:
        return RowVersions(_store(1), self.tmp / "joiner", **self.bounds)  # type: ignore[arg-type]

    @property
    def both(self) -> list[RowVersions]:
        return [self.replica, self.joiner]

    def update(self, rows: list[int], seed: int, on: list[RowVersions]) -> int:
        """One version writing `rows` of server 1 on the servers `on` (server 0 stages none); a
        server behind or resyncing answers its COMMIT STALE (it commits it later, from its stage)."""
        v, token = self.decider.version + 1, 1000 + seed
        values = np.random.default_rng(seed).standard_normal((len(rows), 8)).astype(np.float32)
        written = np.array([0, len(rows) if rows else 0])
        self.decider.stage(StagedRows(v, token, np.empty(0, np.int64), np.empty((0, 8), np.float32)))
        for server in on:
            server.stage(StagedRows(v, token, np.array(rows, dtype=np.int64), values))
        self.decider.commit(v, token, written)
        for server in on:
            with contextlib.suppress(StaleVersion):
                server.commit(v, token, written)
        return v

    def resync(self, replica: Peer | None = None) -> Resync:
        return Resync(self.joiner, Peer(self.decider), [replica or Peer(self.replica)])

    def close(self) -> None:
        for versions in (self.decider, self.replica, self.joiner):
            versions.close()


def _all(versions: RowVersions) -> np.ndarray:
    return versions.store.raw(np.arange(versions.store.num_rows))


def test_a_server_that_lost_its_log_resyncs_from_its_replica_and_catches_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 3: the joiner lost its log (version 0, the checkpoint's rows) after updates wrote its
    rows; catching up is refused (it cannot prove it holds them), so it copies its replica's rows
    at the replica's version, range by range, answering STALE meanwhile (stages go on), claims
    that version and commits the later ones from what it staged (before: it stayed behind)."""
    monkeypatch.setattr(versions_module, "COPY_BYTES", 256)  # several ranges
    cluster = Cluster(tmp_path)
    for seed in range(1, 6):
        cluster.update([seed, 40 + seed, cluster.replica.store.num_rows - seed], seed, cluster.both)
    cluster.joiner.close()
    (tmp_path / "joiner").unlink()  # the disk was replaced
    cluster.joiner = cluster.open_joiner()
    assert cluster.joiner.version == 0
    cluster.update([], 6, [cluster.replica])  # while it was down: none of its rows
    at = cluster.replica.version
    want = _all(cluster.replica)

    seen: list[str] = []

    def while_copying() -> None:
        """The joiner answers nothing meanwhile; an update staged on it now is kept; the replica
        moves on (the copy reads its history at `at`)."""
        with pytest.raises(StaleVersion):
            cluster.joiner.image_at(None)
        with pytest.raises(StaleVersion):
            cluster.joiner.commit(1, 1001, np.array([0, 3]))
        if not seen:
            seen.append("staged")
            cluster.update([2, 7], 7, cluster.both)  # staged on the joiner; its commit there is STALE
        elif len(seen) == 1 and peer.copied == 3:
            seen.append("failed")
            raise ConnectionError("the replica went away mid-copy")

    peer = Peer(cluster.replica, while_copying)
    resync = cluster.resync(peer)
    with pytest.raises(ConnectionError):
        resync.round()
    assert cluster.joiner.resyncing  # half copied: still STALE
    with pytest.raises(StaleVersion):
        cluster.joiner.image_at(None)
    resync.round()  # again, from the start, at the replica's version now
    assert cluster.joiner.version == at + 1 and not cluster.joiner.resyncing
    resync.round()
    assert cluster.joiner.version == cluster.decider.version == at + 1
    np.testing.assert_array_equal(_all(cluster.joiner), _all(cluster.replica))
    assert not np.array_equal(want, _all(cluster.replica))
    assert cluster.joiner.stats()["resyncs"] == 1
    with cluster.joiner.lock.shared():
        cluster.joiner.image_at(at + 1)  # it answers again
    cluster.update([9], 8, cluster.both)  # and takes updates like any server
    np.testing.assert_array_equal(_all(cluster.joiner), _all(cluster.replica))
    rows = _all(cluster.joiner)
    cluster.joiner.close()
    cluster.joiner = cluster.open_joiner()  # its snapshot and the log after it
    assert cluster.joiner.version == cluster.decider.version
    np.testing.assert_array_equal(_all(cluster.joiner), rows)
    assert cluster.joiner.abort(at + 1, 1007)  # it remembers how its versions were decided
    cluster.close()


def test_a_server_behind_the_decided_versions_resyncs(tmp_path: Path) -> None:
    """Item 4: the joiner keeps its log but was down longer than server 0 remembers decided
    versions (3 here): it cannot learn what it missed, so it resyncs (before: it stayed behind
    forever, its rows served by its replica or refused with 503)."""
    cluster = Cluster(tmp_path, max_decided_versions=3)
    cluster.update([1, 2], 1, cluster.both)
    for seed in range(2, 12):
        cluster.update([], seed, [cluster.replica])
    cluster.update([4], 12, cluster.both)  # back up: an update staged on it, not committable yet
    assert cluster.joiner.version == 1
    resync = cluster.resync()
    resync.round()
    resync.round()
    assert cluster.joiner.version == cluster.decider.version == 12
    np.testing.assert_array_equal(_all(cluster.joiner), _all(cluster.replica))
    cluster.close()


def test_without_a_replica_ahead_it_stays_behind_and_stale(tmp_path: Path) -> None:
    """A server that lost its log, whose replica is down (or behind too), claims nothing: it stays
    at its version, answers reads at the cluster's STALE, and resyncs once the replica is up."""
    cluster = Cluster(tmp_path)
    cluster.update([3], 1, cluster.both)
    cluster.joiner.close()
    (tmp_path / "joiner").unlink()
    cluster.joiner = cluster.open_joiner()

    class Down(Peer):
        def changes(self, since: int) -> Changes:
            raise ConnectionError("down")

    cluster.resync(Down(cluster.replica)).round()
    assert cluster.joiner.version == 0 and not cluster.joiner.resyncing
    with pytest.raises(StaleVersion):
        cluster.joiner.image_at(1)
    cluster.resync().round()
    assert cluster.joiner.version == 1
    np.testing.assert_array_equal(_all(cluster.joiner), _all(cluster.replica))
    cluster.close()
