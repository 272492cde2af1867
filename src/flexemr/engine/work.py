"""The work items other threads post to an I/O thread's inbox (`IoThread.post`), one class each.

Every item but `Stop` names the connection it is for; the thread that owns that connection carries
it out (`io_thread.py`: one `match` over these classes). One item is allocated per subrequest
(`Lookup`), as few fields as it needs, with slots.
"""

from __future__ import annotations

import socket
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from flexemr.engine.connection import Connection
from flexemr.transport.base import LookupRequest


@dataclass(slots=True)
class Lookup:
    """Send a subrequest on `conn`; `future` gets its answer."""

    conn: Connection
    request: LookupRequest
    future: Future[np.ndarray]


@dataclass(slots=True)
class Release:
    """Hand `conn` over to I/O thread `target` (live migration)."""

    conn: Connection
    target: int


@dataclass(slots=True)
class Adopt:
    """Start serving `conn` (after a `Release` to this thread)."""

    conn: Connection


@dataclass(slots=True)
class Attach:
    """Install the fresh socket `sock` on `conn` (a reconnect) and serve it."""

    conn: Connection
    sock: socket.socket


@dataclass(slots=True)
class Fail:
    """Close `conn`, failing its subrequests with `reason` (its server stalled or went down)."""

    conn: Connection
    reason: str


@dataclass(slots=True)
class Watch:
    """`shared` baseline only: add `conn` to this thread's selector (every thread serves it)."""

    conn: Connection


@dataclass(slots=True)
class Unwatch:
    """`shared` baseline only: remove `conn` from this thread's selector (it went down)."""

    conn: Connection


@dataclass(slots=True)
class Stop:
    """End the thread's loop."""


ConnectionItem = Lookup | Release | Adopt | Attach | Fail | Watch | Unwatch
WorkItem = ConnectionItem | Stop
