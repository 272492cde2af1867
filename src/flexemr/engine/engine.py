"""`IoEngine`: the multi-threaded, mapping-aware I/O engine, a `LookupTransport` for the ranker.

Modes (`EngineConfig.mode`):
- `mapped`: every data connection is owned by exactly one I/O thread; a subrequest goes to the
  inbox of the thread that owns the connection chosen for it (round robin over the server's
  connections), and nothing on the send/receive path takes a lock;
- `single`: `mapped` with one I/O thread;
- `shared`: the naive baseline, its own class (`shared.SharedIoEngine`, a subclass that replaces
  the few places where threads meet connections): every thread serves every connection, under a
  per-connection lock. `make_engine` builds the class the mode names.

Every connection opens with the handshake (`dial.py`, `protocol.handshake`): both ends prove the
cluster's secret and the server proves it holds the shards the plan gives it. Around the threads: a
control channel per server for credits and the heartbeat (`credits.py`, `health.py`); a supervisor
thread that samples per-connection queues for the migration policy (`migration.py`), carries out
its moves, fails the subrequests of servers that stop answering and notices dead I/O threads; and
a reconnect thread that reopens connections that went down (to servers that answer again).
"""

from __future__ import annotations

import itertools
import logging
import math
import socket
import ssl
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any

import numpy as np

from flexemr.config import Endpoint, EngineConfig, EngineMode, FrameLimits, NodeLimits
from flexemr.config.security import Identity
from flexemr.engine.connection import Connection
from flexemr.engine.credits import ControlChannel, CreditLedger
from flexemr.engine.dial import Dialer
from flexemr.engine.health import ServerHealth
from flexemr.engine.io_thread import GrantSink, IoThread
from flexemr.engine.migration import MigrationPolicy
from flexemr.engine.work import Attach, Fail, Release
from flexemr.protocol.frames import ProtocolError
from flexemr.stats import Count
from flexemr.transport.base import ConfigMismatch, LookupRequest, ServerUnavailable, TransportOverloaded

log = logging.getLogger(__name__)

IDLE_TICKS = 10
"""With no subrequest outstanding, the supervisor wakes every IDLE_TICKS migration intervals (50 ms
by default: well within the heartbeat's timeout) instead of every one."""


class IoEngine:
    """`LookupTransport` over several pipelined connections per server, each owned by one I/O thread."""

    modes: tuple[EngineMode, ...] = ("mapped", "single")
    """The `EngineConfig.mode`s this class runs."""

    def __init__(
        self,
        endpoints: tuple[Endpoint, ...],
        identities: list[Identity],
        config: EngineConfig | None = None,
        limits: FrameLimits | None = None,
        secret: bytes | None = None,
        node_limits: NodeLimits | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        if config.mode not in self.modes:
            raise ValueError(
                f"{type(self).__name__} runs modes {self.modes}, not {config.mode!r} (use make_engine)"
            )
        self.endpoints = endpoints
        self.identities = identities
        """What each server must prove it holds (`config.security.identities`)."""
        self.limits = limits or FrameLimits()
        self.node_limits = node_limits = node_limits or NodeLimits()
        self.dialer = Dialer(uuid.uuid4().hex, secret or b"", self.limits, tls, config.transport)
        self.health = [ServerHealth(node_limits.heartbeat_timeout_s) for _ in endpoints]
        """Per server, what the heartbeat says: readiness reads it, and so may a router."""
        threads = 1 if config.mode == "single" else config.io_threads
        per_server = config.connections_per_server or max(2, math.ceil(threads / len(endpoints)))
        self._connections: list[Connection] = []
        self._by_server: list[list[Connection]] = []
        for server, endpoint in enumerate(endpoints):
            conns = []
            for _ in range(per_server):
                cid = len(self._connections)
                ledger = CreditLedger(config.credit_capacity) if config.credits != "off" else None
                conn = Connection(
                    cid, server, endpoint, identities[server].dim, self.limits, ledger,
                    piggyback=config.credits == "piggyback", debug=config.debug_ownership,
                )  # fmt: skip
                conn.owner = cid % threads
                conns.append(conn)
                self._connections.append(conn)
            self._by_server.append(conns)
        grant = self._grant if config.credits == "priority" else None
        self._threads = self._make_threads(threads, grant, keepalive_s=node_limits.idle_timeout_s / 3)
        self._control: list[ControlChannel | None] = [None] * len(endpoints)
        self._round_robin = [itertools.count() for _ in endpoints]
        self.policy: MigrationPolicy | None = None
        if config.migration and config.mode == "mapped" and threads > 1:
            self.policy = MigrationPolicy(
                threads,
                config.migration_window,
                config.migration_imbalance,
                cooldown=config.migration_cooldown,
            )
        self.migrations = 0
        self._outstanding = 0
        """Subrequests submitted and not yet finished: bounded, so a burst cannot grow the queues."""
        self._outstanding_lock = threading.Lock()
        self._max_outstanding = config.max_in_flight_per_connection * len(self._connections)
        self._broken = ""
        """Why the engine cannot serve at all (an I/O thread died); empty while it can."""
        self._mismatch_logged: set[tuple[int, str]] = set()
        self._closed = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True, name="flexemr-io-supervisor")
        self._reconnector = threading.Thread(
            target=self._reconnect_loop, daemon=True, name="flexemr-io-reconnect"
        )
        self._started = False

    # -- where threads meet connections (what the `shared` baseline replaces) ------------------------

    def _make_threads(self, count: int, grant: GrantSink | None, keepalive_s: float) -> list[IoThread]:
        threads: list[IoThread] = []
        threads.extend(IoThread(i, threads, grant, keepalive_s) for i in range(count))
        return threads

    def _serve_from_start(self, conn: Connection) -> None:
        """Before the threads start: `conn` goes to its owner."""
        owner = self._threads[conn.owner]
        owner.owned.add(conn)
        owner._register(conn)

    def _sender(self, conn: Connection) -> IoThread:
        """The thread that sends a subrequest on `conn`: its owner."""
        return self._threads[conn.owner]

    def _owner(self, conn: Connection) -> IoThread:
        """The thread that closes `conn` or installs a fresh socket on it: its owner."""
        return self._threads[conn.owner]

    # -- start and stop ---------------------------------------------------------------------------------

    def _open(self, conn: Connection, timeout_s: float = 5.0) -> socket.socket:
        credits = conn.credits.capacity if conn.credits is not None else None
        return self.dialer.open(
            conn.endpoint, self.identities[conn.server], "data", conn.cid, credits, timeout_s
        )

    def _open_control(self, server: int, timeout_s: float = 5.0) -> ControlChannel:
        sock = self.dialer.open(
            self.endpoints[server], self.identities[server], "control", timeout_s=timeout_s
        )
        return ControlChannel(
            server, sock, self.limits, self.health[server], self.node_limits.heartbeat_interval_s
        )

    def start(self, timeout: float = 30.0) -> None:
        """Connect everything (waiting up to `timeout` for servers to come up), then start threads.
        Raises ServerUnavailable when a server does not come up in time, and ConfigMismatch at once
        when one is not the server the plan expects (another secret, model or shard set)."""
        deadline = time.monotonic() + timeout
        try:
            for server in range(len(self.endpoints)):
                while self._control[server] is None:
                    try:
                        self._control[server] = self._open_control(server)
                    except (OSError, ProtocolError) as exc:
                        if time.monotonic() > deadline:
                            raise ServerUnavailable(server, str(self.endpoints[server]), str(exc)) from exc
                        time.sleep(0.1)
                for conn in self._by_server[server]:
                    while not conn.alive:
                        try:
                            conn.attach(self._open(conn))
                        except (OSError, ProtocolError) as exc:
                            conn.last_error = str(exc)
                            if time.monotonic() > deadline:
                                raise ServerUnavailable(server, str(conn.endpoint), str(exc)) from exc
                            time.sleep(0.1)
        except BaseException:
            self.close()
            raise
        for conn in self._connections:
            self._serve_from_start(conn)
        for thread in self._threads:
            thread.thread.start()
        self._supervisor.start()
        self._reconnector.start()
        self._started = True

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        for helper in (self._supervisor, self._reconnector):
            if helper.is_alive():
                helper.join(10)
        for thread in self._threads:
            if thread.thread.is_alive():
                thread.stop()
            elif not self._started:
                thread.dispose()
        for conn in self._connections:
            conn.owner_ident = None  # the threads are gone: the closing thread owns everything now
            conn.fail("transport closed")
        for control in self._control:
            if control is not None:
                control.close()

    # -- LookupTransport --------------------------------------------------------------------------------

    def submit(self, server: int, request: LookupRequest) -> Future[np.ndarray]:
        future: Future[np.ndarray] = Future()
        conns = self._by_server[server]
        live = [c for c in conns if c.alive]
        health = self.health[server]
        if not live or not health.up or self._broken or self._closed.is_set():
            reason = (
                "transport closed" if self._closed.is_set()
                else self._broken or health.reason or conns[0].last_error
            )  # fmt: skip
            future.set_exception(ServerUnavailable(server, str(self.endpoints[server]), reason))
            return future
        conn = live[next(self._round_robin[server]) % len(live)]
        with self._outstanding_lock:
            full = self._outstanding >= self._max_outstanding
            if not full:
                self._outstanding += 1
        if full:
            future.set_exception(
                TransportOverloaded(
                    f"{self._outstanding} subrequests already queued or in flight: the ranker is "
                    "overloaded (send fewer requests, or raise max_in_flight_per_connection)"
                )
            )
            return future
        future.add_done_callback(self._finished)
        self._sender(conn).submit(conn, request, future)
        return future

    def _finished(self, future: Future[np.ndarray]) -> None:
        with self._outstanding_lock:
            self._outstanding -= 1

    def connected(self) -> list[bool]:
        return [
            not self._broken and health.up and any(c.alive for c in conns)
            for health, conns in zip(self.health, self._by_server, strict=True)
        ]

    def stats(self) -> dict[str, Any]:
        config = self.config
        return {
            "engine": {
                "mode": config.mode,
                "io_threads": len(self._threads),
                "credits": config.credits,
                "migration": self.policy is not None,
                "migrations": Count(self.migrations),
                "outstanding": self._outstanding,
                "broken": self._broken,
            },
            "threads": [
                {
                    "thread": t.index,
                    "connections": sum(1 for c in self._connections if c.owner == t.index),
                    "queue_depth": t.queue_depth,
                    **t.stats.as_dict(),
                }
                for t in self._threads
            ],
            "connections": [c.snapshot() for c in self._connections],
            "servers": [
                {
                    "server": server,
                    "endpoint": str(self.endpoints[server]),
                    "connected": any(c.alive for c in conns),
                    "health": self.health[server].state,
                    "subrequests": Count(sum(c.stats.subrequests for c in conns)),
                    "bytes_sent": Count(sum(c.stats.bytes_sent for c in conns)),
                    "bytes_received": Count(sum(c.stats.bytes_received for c in conns)),
                    "failures": Count(sum(c.stats.failures for c in conns)),
                    "credit_waits": Count(sum(c.credits.waits for c in conns if c.credits is not None)),
                    "control_grants": Count(control.grants if (control := self._control[server]) else 0),
                }
                for server, conns in enumerate(self._by_server)
            ],
        }

    # -- credits, migration, reconnects -----------------------------------------------------------------

    def _grant(self, conn: Connection, n: int) -> None:
        control = self._control[conn.server]
        if control is not None:
            control.grant(conn.cid, n)

    def server_credit_stats(self, server: int) -> dict[str, Any]:
        """What the server saw of this engine's credits: per connection granted/sent/waits, and the
        grant-to-arrival latency of recent credits (ns)."""
        control = self._control[server]
        if control is None or not control.alive:
            raise ServerUnavailable(server, str(self.endpoints[server]), "no control connection")
        return control.server_stats()

    def owners(self) -> dict[int, int]:
        return {c.cid: c.owner for c in self._connections}

    def migrate(self, connection: int, target: int) -> None:
        """Move a connection to I/O thread `target`, live (mapped mode); the current owner hands it
        over between two event-loop rounds, with its partial frames and pending subrequests."""
        if self.config.mode != "mapped":
            raise ValueError(f"connections migrate in mapped mode only, not {self.config.mode!r}")
        if not 0 <= target < len(self._threads):
            raise ValueError(f"no I/O thread {target} (0..{len(self._threads) - 1})")
        conn = self._connections[connection]
        self._threads[conn.owner].post(Release(conn, target))
        self.migrations += 1

    def set_endpoint(self, server: int, endpoint: Endpoint) -> None:
        """`server` now listens at `endpoint` (restarted elsewhere, e.g. by Ray): connections that
        went down reconnect there."""
        self.endpoints = (*self.endpoints[:server], endpoint, *self.endpoints[server + 1 :])
        for conn in self._by_server[server]:
            conn.endpoint = endpoint

    def _supervise(self) -> None:
        """Never blocks on the network: migration, the heartbeat's verdicts, dead I/O threads."""
        for _ in itertools.count():
            # An idle engine has nothing to balance: it is checked IDLE_TICKS times less often (each
            # wake-up takes the interpreter lock from the threads serving requests).
            idle = not self._outstanding
            if self._closed.wait(self.config.migration_interval_s * (IDLE_TICKS if idle else 1)):
                return
            if self.policy is not None and self._outstanding:
                queued = {c.cid: len(c.pending) for c in self._connections if c.alive}
                move = self.policy.observe(queued, self.owners())
                if move is not None:
                    log.debug("migrating connection %d: thread %d -> %d", *vars(move).values())
                    self.migrate(move.connection, move.target)
            now = time.monotonic()
            for server, (health, control) in enumerate(zip(self.health, self._control, strict=True)):
                if control is not None and not control.alive:
                    if health.state != "down" and health.lost(control.error):
                        self._fail_server(server, f"control connection lost: {control.error}")
                elif health.check(now):
                    self._fail_server(server, health.reason)
            if not self._broken:
                self._check_threads()

    def _fail_server(self, server: int, reason: str) -> None:
        """Fail every subrequest in flight to `server` now (its owners close the connections)."""
        log.warning("embedding server %d at %s is not ready: %s", server, self.endpoints[server], reason)
        for conn in self._by_server[server]:
            self._owner(conn).post(Fail(conn, reason))

    def _check_threads(self) -> None:
        """An I/O thread that died leaves its connections unserved: fail them and everything queued
        for it, loudly, and mark the engine broken (not ready) rather than let requests time out."""
        dead = [t for t in self._threads if not t.thread.is_alive()]
        if not dead:
            return
        self._broken = f"I/O thread {dead[0].index} died (see the log): the ranker must be restarted"
        log.error("%s", self._broken)
        for thread in dead:
            thread.fail_all(self._broken)

    def _reconnect_loop(self) -> None:
        while not self._closed.wait(self.config.reconnect_interval_s):
            if not self._broken:
                self._reconnect()

    def _reconnect(self) -> None:
        timeout = 2 * self.node_limits.heartbeat_timeout_s
        for server, control in enumerate(self._control):
            if control is not None and not control.alive:
                try:
                    self._control[server] = self._open_control(server, timeout)
                except ConfigMismatch as exc:
                    self._refused(server, exc)
                    continue
                except (OSError, ProtocolError):
                    continue
                control.close()
        for conn in self._connections:
            if conn.alive or self._closed.is_set() or not self.health[conn.server].up:
                continue
            try:
                sock = self._open(conn, timeout)
            except ConfigMismatch as exc:
                self._refused(conn.server, exc)
                conn.last_error = str(exc)
                continue
            except (OSError, ProtocolError) as exc:
                conn.last_error = str(exc)
                continue
            log.info("reconnected connection %d to embedding server %d", conn.cid, conn.server)
            self._owner(conn).post(Attach(conn, sock))

    def _refused(self, server: int, exc: ConfigMismatch) -> None:
        """A peer at a server's address failed the handshake: never used; logged once per reason."""
        self.health[server].lost(str(exc))
        if (server, str(exc)) not in self._mismatch_logged:
            self._mismatch_logged.add((server, str(exc)))
            log.error("%s", exc)
