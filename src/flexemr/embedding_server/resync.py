"""A server that cannot prove it holds a version copies its rows from a replica, then catches up.

A server behind the cluster commits the versions it missed from server 0's decided ones (token and
write set): that needs, for every one that wrote its rows, exactly the rows it staged. A server that
lost its log (a deleted log_dir, a disk replaced, a new replica) holds none of them, and one down
longer than server 0 remembers decided versions cannot even learn them: neither can ever commit its
way forward. Such a server resyncs, driven by a thread of its own process:

    every poll_s: server 0's version (every version is decided there first) above ours?
      commit the versions we missed from server 0's decided ones, in order     (the usual catch-up)
      one forgotten by server 0, or one we cannot prove (`Unproven`)?  -> resync:
        pick a replica of our shards (the same rows at the same offsets) at a version v above ours
        answer every lookup and commit STALE from now on (stages go on: updates keep flowing)
        copy its rows range by range as stored at v (ROWS, over an authenticated link: the
          handshake proves the cluster secret and the replica's shards before any row moves)
        claim v (its token and write set from server 0), snapshot the state, start the log afresh
        answer again; the next round commits v+1.. (their rows were staged here meanwhile)

The server drives it, not a ranker or an updater: it is the one that knows it lost its log, it runs
whether or not any ranker or updater does, several rankers would race to resync it, and rows move
from replica to server directly (never through a ranker's memory). Server 0 never resyncs: it
decides versions and remembers the applied (source, sequence) pairs, which no replica holds.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Protocol

from flexemr.embedding_server.versions import MAX_CHANGES_VERSIONS, RowVersions, StaleVersion, Unproven
from flexemr.logs import RateLimitedWarnings
from flexemr.protocol.answers import LookupFailed
from flexemr.protocol.updates import LATEST, BadUpdate, Changes, RowsCopy

log = logging.getLogger(__name__)
log.addFilter(RateLimitedWarnings())  # a peer down for long would repeat itself every round

POLL_S = 1.0
"""How often a server asks server 0 whether it is behind."""


class Peer(Protocol):
    """Another embedding server, over an authenticated link (`engine.link.ServerLink`). Its calls
    raise ConnectionError when it cannot be reached, LookupFailed when it refuses or is STALE."""

    server: int

    def changes(self, since: int) -> Changes: ...

    def rows(self, version: int, start: int, stop: int) -> RowsCopy: ...

    def close(self) -> None: ...


class Resync:
    def __init__(
        self, versions: RowVersions, decider: Peer, replicas: Sequence[Peer], poll_s: float = POLL_S
    ) -> None:
        """`decider`: server 0; `replicas`: the servers holding exactly our shards."""
        self._versions = versions
        self._decider = decider
        self._replicas = replicas
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="resync")

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop the thread (a round blocked on a peer ends with the process: it is a daemon)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)
        for peer in {id(p): p for p in [self._decider, *self._replicas]}.values():
            peer.close()

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.round()
            except (ConnectionError, LookupFailed, BadUpdate, OSError) as exc:
                log.warning(
                    "embedding server %d: version check or resync failed (tried again in %.0f s): %s",
                    self._versions.store.server, self._poll_s, exc, extra={"rate_key": "resync"},
                )  # fmt: skip

    def round(self) -> None:
        """Catch up with server 0, resyncing first when that cannot be done."""
        versions = self._versions
        if not versions.resyncing:
            if self._decider.changes(LATEST).version <= versions.version:
                return
            if self._caught_up():
                return
        self._resync()

    def _caught_up(self) -> bool:
        """Commit the versions server 0 decided after ours, in order; False when one of them is
        forgotten there, or cannot be proven here (its rows were never staged here)."""
        versions = self._versions
        while True:
            mine = versions.version
            decided = self._decider.changes(mine)
            if decided.version <= mine:
                return True
            if decided.versions.size == 0 or decided.versions[0] > mine + 1:
                oldest = int(decided.versions[0]) if decided.versions.size else decided.version
                log.warning(
                    "embedding server %d is at version %d; server 0 remembers versions from %d on only",
                    versions.store.server, mine, oldest,
                )  # fmt: skip
                return False
            for i, version in enumerate(decided.versions.tolist()):
                if version <= mine:
                    continue
                try:
                    versions.commit(version, int(decided.tokens[i]), decided.written[i])
                except Unproven as exc:
                    log.warning("%s", exc)
                    return False
                except StaleVersion as exc:  # decided otherwise than server 0 says: never guessed
                    log.warning(
                        "embedding server %d cannot commit version %d as server 0 decided it: %s",
                        versions.store.server, version, exc, extra={"rate_key": "decided otherwise"},
                    )  # fmt: skip
                    return True

    def _resync(self) -> None:
        """Copy a replica's rows at its version, then claim that version (`RowVersions.finish_resync`)."""
        versions = self._versions
        me = versions.store.server
        at: list[tuple[int, Peer]] = []
        for peer in self._replicas:
            try:
                at.append((peer.changes(LATEST).version, peer))
            except (ConnectionError, LookupFailed) as exc:
                log.info("embedding server %d: replica %d cannot be asked: %s", me, peer.server, exc)
        ahead = [(v, p) for v, p in at if v > versions.version or versions.resyncing]
        if not ahead:
            log.warning(
                "embedding server %d cannot prove it holds a version above %d, and no replica of its "
                "shards is up and ahead: it stays behind (answers STALE) until one is",
                me, versions.version, extra={"rate_key": "no replica"},
            )  # fmt: skip
            return
        version, peer = max(ahead, key=lambda a: a[0])
        log.warning(
            "embedding server %d (at version %d) resyncs its rows from server %d at version %d",
            me, versions.version, peer.server, version,
        )  # fmt: skip
        versions.begin_resync()
        rows, step = versions.store.num_rows, versions.copy_rows
        for start in range(0, rows, step):
            versions.copy_in(peer.rows(version, start, min(start + step, rows)))
        versions.finish_resync(version, self._decider.changes(max(0, version - MAX_CHANGES_VERSIONS)))
        log.warning("embedding server %d resynced at version %d", me, version)
