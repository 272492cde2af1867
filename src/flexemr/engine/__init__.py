"""The multi-threaded, mapping-aware I/O engine: a `LookupTransport` for the ranker.

engine.py      IoEngine: connects, routes subrequests to the thread owning a connection, stats
io_thread.py   one selectors event loop per I/O thread, owning its connections
work.py        the typed work items threads post to each other (Lookup, Release, Adopt, ...)
shared.py      SharedIoEngine: the lock-sharing baseline (mode `shared`), IoEngine's interface
connection.py  a non-blocking, pipelined data connection (zero-copy send, incremental receive)
dial.py        opening a connection: socket options, optional TLS, the authenticated handshake
credits.py     the credit ledger (pure) and the high-priority control channel (with the heartbeat)
health.py      a server's liveness as the heartbeat sees it (pure)
migration.py   the migration policy (pure): when to move which connection to which thread
link.py        a blocking request/answer link to one server (updates, commits, changelogs)
stats.py       counters per thread and per connection
"""

from __future__ import annotations

import ssl

from flexemr.config import Endpoint, EngineConfig, FrameLimits, NodeLimits
from flexemr.config.security import Identity
from flexemr.engine.engine import IoEngine
from flexemr.engine.migration import MigrationPolicy, Move
from flexemr.engine.shared import SharedIoEngine

__all__ = ["IoEngine", "MigrationPolicy", "Move", "SharedIoEngine", "make_engine"]


def make_engine(
    endpoints: tuple[Endpoint, ...],
    identities: list[Identity],
    config: EngineConfig | None = None,
    limits: FrameLimits | None = None,
    secret: bytes | None = None,
    node_limits: NodeLimits | None = None,
    tls: ssl.SSLContext | None = None,
) -> IoEngine:
    """The engine `config.mode` names (not started): the mapping-aware `IoEngine` for `mapped` and
    `single`, the lock-sharing baseline `SharedIoEngine` for `shared`."""
    engine = SharedIoEngine if config is not None and config.mode in SharedIoEngine.modes else IoEngine
    return engine(endpoints, identities, config, limits, secret, node_limits, tls)
