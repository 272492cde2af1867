"""The multi-threaded, mapping-aware I/O engine: a `LookupTransport` for the ranker.

engine.py      IoEngine: connects, routes subrequests to the thread owning a connection, stats
io_thread.py   one selectors event loop per I/O thread, owning its connections
connection.py  a non-blocking, pipelined data connection (zero-copy send, incremental receive)
dial.py        opening a connection: socket options, optional TLS, the authenticated handshake
credits.py     the credit ledger (pure) and the high-priority control channel (with the heartbeat)
health.py      a server's liveness as the heartbeat sees it (pure)
migration.py   the migration policy (pure): when to move which connection to which thread
stats.py       counters per thread and per connection
"""

from flexemr.engine.engine import IoEngine
from flexemr.engine.migration import MigrationPolicy, Move

__all__ = ["IoEngine", "MigrationPolicy", "Move"]
