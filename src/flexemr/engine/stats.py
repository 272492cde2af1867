"""Counters of the I/O engine, per I/O thread and per data connection.

Each counter is written by one thread only (the owner of the thread or connection) and read
without locks for `stats()`; a snapshot may be a few events stale, never torn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from flexemr.stats import counts


@dataclass
class ThreadStats:
    subrequests: int = 0
    """Subrequests this thread put on the wire."""
    responses: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    loops: int = 0
    """Event-loop iterations (select calls)."""
    credit_waits: int = 0
    """Times one of its connections had more in flight than credits out at the server."""
    migrations_in: int = 0
    migrations_out: int = 0
    forwarded: int = 0
    """Work items that reached this thread after their connection had moved, and were passed on."""

    def as_dict(self) -> dict[str, Any]:
        return counts(asdict(self))


@dataclass
class ConnectionStats:
    subrequests: int = 0
    responses: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    failures: int = 0
    """Subrequests answered with an ERROR frame or a malformed result."""
    migrations: int = 0
    """Times this connection changed owner thread."""

    def as_dict(self) -> dict[str, Any]:
        return counts(asdict(self))
