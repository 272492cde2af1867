"""The ranker's read version without a network: links that answer, stall or fail on cue. A sync
round never holds the read lock while it waits for a server (issue #27 item 9), a round whose
reachable servers are all behind the ranker fails nobody with an internal error (item 10), and
nothing is read before the first round heard from a server (item 8)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

from flexemr.protocol.updates import Changes
from flexemr.ranker import row_versions as versions_module
from flexemr.ranker.row_versions import BehindVersion, NoVersion, RowReadVersion
from flexemr.transport.base import ServerUnavailable


class FakeLink:
    """A server at `version` whose CHANGES can be held (`stall`) or fail (`down`)."""

    def __init__(self, server: int, version: int) -> None:
        self.server = server
        self.version = version
        self.down = False
        self.stall = threading.Event()
        self.stall.set()  # set: answers at once
        self.stalled = threading.Event()

    def changes(self, since: int) -> Changes:
        if not self.stall.is_set():
            self.stalled.set()
            self.stall.wait(30)
        if self.down:
            raise ServerUnavailable(self.server, "fake", "down")
        versions = np.arange(since + 1, self.version + 1, dtype=np.int64)
        written = np.zeros((versions.size, 2), dtype=np.int64)
        return Changes(self.version, False, versions, versions, written, np.empty(0, np.int64))

    def catch_up(self, version: int, decided: Changes) -> None:
        self.version = max(self.version, int(decided.version))

    def close(self) -> None:
        pass


@pytest.fixture
def fakes() -> Iterator[list[FakeLink]]:
    links = [FakeLink(0, 5), FakeLink(1, 5)]
    yield links
    for link in links:
        link.stall.set()


def _read_version(links: list[FakeLink]) -> RowReadVersion:
    return RowReadVersion(links, None, poll_s=0.01)  # type: ignore[arg-type]


def test_nothing_is_read_before_the_first_round_heard_from_a_server(
    fakes: list[FakeLink], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(versions_module, "WAIT_S", 0.2)
    for link in fakes:
        link.stall.clear()
    versions = _read_version(fakes)
    assert fakes[0].stalled.wait(10)
    assert not versions.synced.is_set()
    with pytest.raises(NoVersion), versions.reading():
        pass  # never reached: version 0 is not the cluster's
    for link in fakes:
        link.stall.set()
    assert versions.synced.wait(10)
    with versions.reading() as version:
        assert version == 5
    versions.close()


def test_a_stalled_server_never_holds_up_reads(fakes: list[FakeLink]) -> None:
    versions = _read_version(fakes)
    assert versions.synced.wait(10)
    fakes[1].stall.clear()
    fakes[0].version = 6  # a new version: the next round asks server 1, which stalls
    assert fakes[1].stalled.wait(10)
    read: list[int] = []

    def reader() -> None:
        with versions.reading() as version:
            read.append(version)

    thread = threading.Thread(target=reader)
    thread.start()
    thread.join(10)
    assert read == [5]  # answered during the round, at the version it had
    fakes[1].stall.set()
    versions.read_at_least(6)
    assert versions.version == 6
    versions.close()


def test_reachable_servers_all_behind_the_ranker_is_no_internal_error(fakes: list[FakeLink]) -> None:
    versions = _read_version(fakes)
    assert versions.synced.wait(10)
    fakes[0].down = True  # the servers at version 5 are gone; one that lost its log is back at 3
    fakes[1].version = 3
    versions.stale(3)  # a round runs and keeps version 5 (before: StopIteration, an HTTP 500)
    assert versions.version == 5 and versions.stats()["sync_rounds_failed"] == 0
    versions.close()


def test_a_request_needing_a_newer_version_syncs_at_once_or_is_refused(fakes: list[FakeLink]) -> None:
    """Read-your-writes across rankers: a request carrying version 6 (pushed through another
    ranker) starts a round now rather than at the next poll (an hour away here); a version no
    server holds is refused (`BehindVersion`, HTTP 503) once its time is up."""
    versions = RowReadVersion(fakes, None, poll_s=3600)  # type: ignore[arg-type]
    assert versions.synced.wait(10)
    fakes[0].version = 6
    versions.require(6, timeout_s=30)
    assert versions.version == 6
    with pytest.raises(BehindVersion, match="reads row version 6, not the 7 the request needs"):
        versions.require(7, timeout_s=0.3)
    versions.close()
