"""The version a ranker reads, and moving it when the servers' changes.

Every lookup names the ranker's read version; servers answer it from their history while they
can, and a server behind it (or whose history no longer reaches back) answers STALE, and the
request's pooling runs again after the next sync round.

Sync rounds run on one background thread, never on a request's path:

    round (no lock held: requests keep reading the current version from the servers' history)
      ask every server for its version and the keys it changed since ours   (CHANGES; each link
        has its own short timeout, so a stalled server costs one timeout, and it counts as
        unreachable)
      target = the highest version a reachable server holds; a server behind it commits what it
        missed (versions, tokens and write sets from an up-to-date server's changelog: a version
        committed anywhere is decided; a server that cannot prove it holds one stays behind)
    switch (exclusive: no request is pooling meanwhile, so none mixes cached rows of two versions)
      invalidate the changed keys in the cache (clear it when a changelog no longer reaches back,
        or when a server could not be asked while moving forward), then read at the target

A row that a request reads from the cache was cached at the request's version or before and not
changed since (it would have been invalidated), so it equals the servers' row at that version.
Until the first round has heard from the servers, no request is served (`ready` is False and a
request waits for it, then fails): a fresh ranker never reads the checkpoint's rows of a cluster
that has moved on. Servers answering from their history tell a ranker nothing of a new version, so
the thread polls server 0 (every version is decided there first) every `poll_s`; an update pushed
through this ranker waits for a round that sees it (`read_at_least`), so its pusher reads its
own writes; a request that names a minimum version (a client carrying the version its push
through another ranker answered) waits for rounds that reach it (`require`, bounded, then 503);
a request answered STALE waits for the next round.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from flexemr.cache import AdaptiveCacheManager
from flexemr.engine.link import ServerLink
from flexemr.protocol.updates import LATEST, Changes
from flexemr.rwlock import SharedLock
from flexemr.stats import counts
from flexemr.transport.base import LookupFailed, ServerUnavailable

log = logging.getLogger(__name__)

POLL_S = 0.2
SYNC_TIMEOUT_S = 5.0
"""How long a sync round waits for one server's answer (links made for a ranker use it)."""
WAIT_S = 10.0
"""How long a request waits for the first round, or a STALE request for the next one."""


class NoVersion(LookupFailed):
    """No sync round has heard from the servers yet: nothing is scored (HTTP 503)."""


class BehindVersion(LookupFailed):
    """The ranker does not read the row version a request needs (`require`): nothing is scored
    (HTTP 503)."""


class RowReadVersion:
    def __init__(
        self, links: list[ServerLink], cache: AdaptiveCacheManager | None, poll_s: float = POLL_S
    ) -> None:
        self.version = 0
        self._links = links
        self._cache = cache
        self._lock = SharedLock()
        self.transitions = self.stale_answers = self.rows_invalidated = self.cache_clears = 0
        self.rounds_failed = 0
        self.synced = threading.Event()
        """Set by the first round that heard from a server: before it, nothing is read."""
        self._rounds = threading.Condition()
        self._started = self._finished = 0
        self._wake = threading.Event()
        self._wake.set()  # the first round now
        self._stop = threading.Event()
        self._syncer = threading.Thread(target=self._run, args=(poll_s,), daemon=True, name="version-sync")
        self._syncer.start()

    @contextlib.contextmanager
    def reading(self) -> Iterator[int]:
        """The version to read; it does not change until the block ends. NoVersion when the
        first sync round has not heard from the servers within WAIT_S."""
        if not self.synced.wait(WAIT_S):
            raise NoVersion(
                "the ranker does not know the rows' version yet: no embedding server answered its "
                "first sync (are they up?)"
            )
        with self._lock.shared():
            yield self.version

    def stale(self, seen: int) -> None:
        """A server answered STALE (it is at version `seen`) to a lookup at our version or one
        since left: wait for a round started after it (outside any read)."""
        self.stale_answers += 1
        if seen != self.version:
            self._await_round(WAIT_S)

    def read_at_least(self, version: int, timeout_s: float = WAIT_S) -> bool:
        """Wait (`timeout_s` at most) until this ranker reads `version` or later, starting sync
        rounds at once rather than at the next poll: the caller (or a client, through another
        ranker) committed it, and requests from now on are to see it. False when it did not."""
        deadline = time.monotonic() + timeout_s
        rounds = 0
        while self.version < version and time.monotonic() < deadline and not self._stop.is_set():
            if rounds:  # not there yet: the version may not be committed yet, ask again shortly
                self._stop.wait(min(POLL_S / 4, max(0.0, deadline - time.monotonic())))
            self._await_round(deadline - time.monotonic())
            rounds += 1
        if self.version < version:
            log.warning("reading version %d, not %d yet: a sync round failed", self.version, version)
            return False
        return True

    def require(self, version: int, timeout_s: float = WAIT_S) -> None:
        """`read_at_least(version)`, or `BehindVersion` (HTTP 503) when this ranker does not read
        it within `timeout_s`: a client that got `version` from a push, through any ranker of
        the cluster, reads its write here or is refused, never served older rows."""
        if not self.read_at_least(version, timeout_s):
            raise BehindVersion(
                f"this ranker reads row version {self.version}, not the {version} the request needs "
                f"(no sync round reached it within {timeout_s:g} s); retry, or a newer version is "
                "not committed yet"
            )

    # -- the sync thread ----------------------------------------------------------------------------

    def _await_round(self, timeout_s: float) -> None:
        with self._rounds:
            wanted = self._started + 1  # a round that starts after now
            self._wake.set()
            self._rounds.wait_for(lambda: self._finished >= wanted or self._stop.is_set(), timeout_s)

    def _run(self, poll_s: float) -> None:
        while True:
            woken = self._wake.wait(poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            if not woken and self.synced.is_set() and not self._moved():
                continue
            with self._rounds:
                self._started += 1
                number = self._started
            try:
                self._sync()
            except (ServerUnavailable, LookupFailed) as exc:
                self.rounds_failed += 1
                log.warning("version sync failed: %s", exc)
            finally:
                with self._rounds:
                    self._finished = number
                    self._rounds.notify_all()

    def _moved(self) -> bool:
        """Whether server 0 is at another version than ours (False when it cannot be asked:
        requests that need a round ask for one)."""
        try:
            return self._links[0].changes(LATEST).version != self.version
        except (ServerUnavailable, LookupFailed):
            return False

    def _sync(self) -> None:
        since = self.version  # only this thread changes it
        seen: dict[int, Changes] = {}
        unreachable = []
        for link in self._links:
            try:
                seen[link.server] = link.changes(since)
            except (ServerUnavailable, LookupFailed) as exc:
                unreachable.append(link.server)
                log.warning("version sync: %s", exc)
        if not seen:
            raise LookupFailed("no embedding server answered CHANGES")
        target = max(c.version for c in seen.values())
        behind = {s: c.version for s, c in seen.items() if c.version < target}
        if behind:
            ahead = next(s for s, c in seen.items() if c.version == target)
            decided = self._links[ahead].changes(min(behind.values()))
            for server, at in behind.items():
                try:
                    self._links[server].catch_up(at, decided)
                    seen[server] = self._links[server].changes(min(at, since))
                    log.info("embedding server %d was behind at %d: committed up to %d", server, at, target)
                except (ServerUnavailable, LookupFailed) as exc:
                    unreachable.append(server)
                    log.warning("embedding server %d stays behind at version %d: %s", server, at, exc)
        if target > since or behind:
            with self._lock.exclusive():
                self._invalidate(seen, clear=bool(unreachable) and target > since)
                if target > since:
                    log.info("reading version %d (was %d)", target, since)
                    self.version = target
                    self.transitions += 1
        self.synced.set()

    def _invalidate(self, seen: dict[int, Changes], clear: bool) -> None:
        if self._cache is None:
            return
        if clear or any(c.truncated for c in seen.values()):
            self.rows_invalidated += self._cache.clear()
            self.cache_clears += 1
            return
        keys = np.unique(np.concatenate([c.keys for c in seen.values()])) if seen else np.empty(0, np.int64)
        if keys.size:
            self.rows_invalidated += self._cache.invalidate(torch.from_numpy(keys))

    def stats(self) -> dict[str, Any]:
        return {
            "version": self.version,
            **counts(
                {
                    "transitions": self.transitions,
                    "stale_answers": self.stale_answers,
                    "rows_invalidated": self.rows_invalidated,
                    "cache_clears": self.cache_clears,
                    "sync_rounds_failed": self.rounds_failed,
                }
            ),
        }

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._syncer.join(10)
        for link in self._links:
            link.close()
