"""The ranker's view of the network: submit a subrequest to a server, get a future of its answer.

Anything that moves subrequests (the multi-threaded I/O engine, the Redis baseline, later a
UCX/RDMA backend) implements `LookupTransport`; the ranker needs nothing else.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

# What a server's answers decode to (`protocol.answers`), for the users of a transport:
from flexemr.protocol.answers import LookupFailed as LookupFailed
from flexemr.protocol.answers import Stale as Stale
from flexemr.protocol.answers import SubrequestRefused as SubrequestRefused


@dataclass(frozen=True)
class LookupRequest:
    rows: np.ndarray
    """int32 or int64 [n]: server-local rows, grouped by bag."""
    offsets: np.ndarray
    """[bags], the dtype of `rows`: where each bag starts in `rows`."""
    raw: bool = False
    """Ask for the rows themselves instead of per-bag partial sums."""
    weights: np.ndarray | None = None
    """float32 [n]: optional per-index weights (partial mode only)."""
    version: int | None = None
    """The version of the rows to read (`ranker.row_versions`); a server at another one answers
    `Stale`. None: whatever the server has committed."""
    out: np.ndarray | None = None
    """float32 [`expected_shape`], C-contiguous: where the transport, if it can, receives the answer
    (straight from the socket, no copy), and the array the future then resolves to; None (or an
    array of another shape or dtype): an array of the answer's own. A late answer to a subrequest
    the caller gave up on may still land here, so the caller never reads an abandoned one's `out`."""

    def expected_shape(self, dim: int) -> tuple[int, int]:
        return (self.rows.size if self.raw else self.offsets.size, dim)


class ServerUnavailable(ConnectionError):
    """An embedding server cannot be reached, or went away with the request in flight."""

    def __init__(self, server: int, endpoint: str, reason: str) -> None:
        super().__init__(f"embedding server {server} at {endpoint} is unavailable: {reason}")
        self.server = server


class NoReplica(ServerUnavailable):
    """No replica of some rows can answer: every server holding them is down, stalled or failed."""

    def __init__(self, servers: list[int], reason: str) -> None:
        ConnectionError.__init__(self, reason)
        self.server = servers[0]
        self.servers = servers


class TransportOverloaded(LookupFailed):
    """The transport's queues are full: the subrequest was refused without being sent."""


class ConfigMismatch(LookupFailed):
    """A server failed the handshake: it holds another secret, model or shard set than this
    ranker's cluster spec says. It is never used."""

    def __init__(self, server: int, endpoint: str, reason: str) -> None:
        super().__init__(f"embedding server {server} at {endpoint} refused: {reason}")
        self.server = server


class LookupTransport(Protocol):
    def submit(self, server: int, request: LookupRequest) -> Future[np.ndarray]:
        """Send `request` to `server`; the future resolves to float32 [bags or rows, dim], or fails
        with `ServerUnavailable` or a `LookupFailed`. Never blocks on the network for long."""
        ...

    def connected(self) -> list[bool]:
        """Per server: is it usable right now (connected, authenticated, answering)?"""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for observability (requests, bytes, failures...)."""
        ...

    def close(self) -> None: ...
