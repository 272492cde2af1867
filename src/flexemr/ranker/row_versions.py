"""The version a ranker reads, and moving it when the servers' changes.

Every lookup names the ranker's read version; servers answer it from their history while they
can, and a server behind it (or whose history no longer reaches back) answers STALE, and the
request's pooling runs again after `sync`:

    sync (exclusive: no request is pooling meanwhile, so none mixes cached rows of two versions)
      ask every server for its version and the keys it changed since ours   (CHANGES)
      target = the highest version; a server behind it commits what it missed (its versions and
        tokens from an up-to-date server's changelog: a version committed anywhere is decided)
      invalidate the changed keys in the cache (clear it when a changelog no longer reaches back,
        or when a server could not be asked while moving forward), then read at the target

A row that a request reads from the cache was cached at the request's version or before and not
changed since (it would have been invalidated), so it equals the servers' row at that version.
Servers answering from their history tell a ranker nothing of a new version, so a thread polls
server 0 (every version is committed there first) every `poll_s`; an update pushed through this
ranker moves it at once (`read_at_least`), so its pusher reads its own writes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from flexemr.cache import AdaptiveCacheManager
from flexemr.engine.link import ServerLink
from flexemr.protocol.updates import LATEST, Changes
from flexemr.rwlock import SharedLock
from flexemr.stats import counts
from flexemr.transport.base import LookupFailed, ServerUnavailable, Stale

log = logging.getLogger(__name__)

POLL_S = 0.2


class RowReadVersion:
    def __init__(
        self, links: list[ServerLink], cache: AdaptiveCacheManager | None, poll_s: float = POLL_S
    ) -> None:
        self.version = 0
        self._links = links
        self._cache = cache
        self._lock = SharedLock()
        self.transitions = self.stale_answers = self.rows_invalidated = self.cache_clears = 0
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, args=(poll_s,), daemon=True, name="version-poll")
        self._poller.start()

    def _poll(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                latest = self._links[0].changes(LATEST).version
            except (ServerUnavailable, LookupFailed):
                continue  # requests find out for themselves
            if latest != self.version:
                self.sync(latest)

    @contextlib.contextmanager
    def reading(self) -> Iterator[int]:
        """The version to read; it does not change until the block ends."""
        with self._lock.shared():
            yield self.version

    def stale(self, answer: Stale) -> None:
        """A server answered STALE to a lookup at `self.version` (or at a version since left)."""
        self.stale_answers += 1
        self.sync(answer.version)

    def read_at_least(self, version: int) -> None:
        """Move to `version` (or beyond) now unless reading it already: the caller committed it,
        and its next requests are to see it (servers would answer the older version meanwhile)."""
        self._sync_unless(lambda: self.version >= version)

    def sync(self, seen: int) -> None:
        """Some server is at version `seen`: catch up with the servers unless that is ours."""
        self._sync_unless(lambda: seen == self.version)

    def _sync_unless(self, current: Callable[[], bool]) -> None:
        with self._lock.exclusive():
            if current():  # another request has synced meanwhile
                return
            try:
                self._sync()
            except (ServerUnavailable, LookupFailed) as exc:
                log.warning("version sync failed: %s", exc)

    def _sync(self) -> None:
        seen: dict[int, Changes] = {}
        unreachable = []
        for link in self._links:
            try:
                seen[link.server] = link.changes(self.version)
            except (ServerUnavailable, LookupFailed) as exc:
                unreachable.append(link.server)
                log.warning("version sync: %s", exc)
        target = max([self.version, *(c.version for c in seen.values())])
        behind = {s: c.version for s, c in seen.items() if c.version < target}
        if behind:
            ahead = next(s for s, c in seen.items() if c.version == target)
            decided = self._links[ahead].changes(min(behind.values()))
            for server, at in behind.items():
                try:
                    self._links[server].catch_up(at, decided)
                    seen[server] = self._links[server].changes(min(at, self.version))
                    log.info(
                        "embedding server %d was behind at version %d: committed up to %d", server, at, target
                    )
                except (ServerUnavailable, LookupFailed) as exc:
                    unreachable.append(server)
                    log.warning("embedding server %d stays behind at version %d: %s", server, at, exc)
        if target > self.version or behind:
            self._invalidate(seen, clear=bool(unreachable) and target > self.version)
        if target != self.version:
            log.info("reading version %d (was %d)", target, self.version)
            self.version = target
            self.transitions += 1

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
                }
            ),
        }

    def close(self) -> None:
        self._stop.set()
        self._poller.join(10)
        for link in self._links:
            link.close()
