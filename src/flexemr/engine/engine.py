"""`IoEngine`: the multi-threaded, mapping-aware I/O engine, a `LookupTransport` for the ranker.

Modes (`EngineConfig.mode`):
- `mapped`: every data connection is owned by exactly one I/O thread; a subrequest goes to the
  inbox of the thread that owns the connection chosen for it (round robin over the server's
  connections), and nothing on the send/receive path takes a lock;
- `single`: `mapped` with one I/O thread;
- `shared`: the naive baseline: every thread serves every connection, under a per-connection lock.

Around the threads: a control channel per server for credits (`credits.py`), and a supervisor
thread that samples per-connection queues for the migration policy (`migration.py`), carries out
its moves, and reconnects connections that went down.
"""

from __future__ import annotations

import itertools
import logging
import math
import socket
import threading
import uuid
from concurrent.futures import Future
from typing import Any

import numpy as np

from flexemr.config import Endpoint, EngineConfig
from flexemr.engine.connection import Connection, open_data_socket
from flexemr.engine.credits import ControlChannel, CreditLedger, mark_high_priority
from flexemr.engine.io_thread import IoThread
from flexemr.engine.migration import MigrationPolicy
from flexemr.protocol.frames import FrameLimits, ProtocolError
from flexemr.transport.base import LookupFailed, LookupRequest, ServerUnavailable

log = logging.getLogger(__name__)


class IoEngine:
    """`LookupTransport` over several pipelined connections per server, served by I/O threads."""

    def __init__(
        self,
        endpoints: tuple[Endpoint, ...],
        server_rows: list[int],
        dim: int,
        config: EngineConfig | None = None,
        limits: FrameLimits | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        self.endpoints = endpoints
        self.server_rows = server_rows
        self.dim = dim
        self.limits = limits or FrameLimits()
        self.session = uuid.uuid4().hex
        threads = 1 if config.mode == "single" else config.io_threads
        per_server = config.connections_per_server or max(2, math.ceil(threads / len(endpoints)))
        shared = config.mode == "shared"
        self._threads: list[IoThread] = []
        grant = self._grant if config.credits == "priority" else None
        self._threads.extend(IoThread(i, self._threads, shared, grant) for i in range(threads))
        self._connections: list[Connection] = []
        self._by_server: list[list[Connection]] = []
        for server, endpoint in enumerate(endpoints):
            conns = []
            for _ in range(per_server):
                cid = len(self._connections)
                ledger = CreditLedger(config.credit_capacity) if config.credits != "off" else None
                conn = Connection(
                    cid, server, endpoint, dim, self.limits, ledger,
                    piggyback=config.credits == "piggyback", shared=shared, debug=config.debug_ownership,
                )  # fmt: skip
                conn.owner = cid % threads
                conns.append(conn)
                self._connections.append(conn)
            self._by_server.append(conns)
        self._control: list[ControlChannel | None] = [None] * len(endpoints)
        self._round_robin = [itertools.count() for _ in endpoints]
        self._thread_round_robin = itertools.count()
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
        self._closed = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True, name="flexemr-io-supervisor")
        self._started = False

    # -- start and stop ---------------------------------------------------------------------------------

    def _options(self, conn: Connection) -> dict[str, Any]:
        options: dict[str, Any] = {"session": self.session, "conn": conn.cid}
        if conn.credits is not None:
            options["credits"] = conn.credits.capacity
        return options

    def _open(self, conn: Connection) -> socket.socket:
        return open_data_socket(
            conn.endpoint,
            conn.server,
            self.server_rows[conn.server],
            self.dim,
            self.limits,
            self._options(conn),
        )

    def _open_control(self, server: int) -> ControlChannel:
        sock = socket.create_connection(
            (self.endpoints[server].host, self.endpoints[server].port), timeout=5.0
        )
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mark_high_priority(sock)
            from flexemr.protocol.frames import MessageType, encode, recv_frame, send_frame

            hello = np.frombuffer(
                f'{{"session": "{self.session}", "control": true}}'.encode(), dtype=np.uint8
            )
            send_frame(sock, encode(MessageType.HELLO, 0, [hello]))
            recv_frame(sock, self.limits)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return ControlChannel(server, sock, self.limits)

    def start(self, timeout: float = 30.0) -> None:
        """Connect everything (waiting up to `timeout` for servers to come up), then start threads."""
        deadline = threading.Event()
        timer = threading.Timer(timeout, deadline.set)
        timer.start()
        try:
            for server in range(len(self.endpoints)):
                while self.config.credits == "priority" and self._control[server] is None:
                    try:
                        self._control[server] = self._open_control(server)
                    except OSError as exc:
                        if deadline.wait(0.1):
                            raise ServerUnavailable(server, str(self.endpoints[server]), str(exc)) from exc
                for conn in self._by_server[server]:
                    while not conn.alive:
                        try:
                            conn.attach(self._open(conn))
                        except OSError as exc:
                            conn.last_error = str(exc)
                            if deadline.wait(0.1):
                                self.close()
                                raise ServerUnavailable(server, str(conn.endpoint), str(exc)) from exc
        finally:
            timer.cancel()
        for conn in self._connections:
            if self.config.mode == "shared":
                for thread in self._threads:
                    thread._register(conn)
            else:
                owner = self._threads[conn.owner]
                owner.owned.add(conn)
                owner._register(conn)
        for thread in self._threads:
            thread.thread.start()
        self._supervisor.start()
        self._started = True

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._supervisor.is_alive():
            self._supervisor.join(5)
        for thread in self._threads:
            if thread.thread.is_alive():
                thread.stop()
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
        if not live or self._closed.is_set():
            reason = "transport closed" if self._closed.is_set() else conns[0].last_error
            future.set_exception(ServerUnavailable(server, str(self.endpoints[server]), reason))
            return future
        conn = live[next(self._round_robin[server]) % len(live)]
        with self._outstanding_lock:
            full = self._outstanding >= self._max_outstanding
            if not full:
                self._outstanding += 1
        if full:
            future.set_exception(
                LookupFailed(
                    f"{self._outstanding} subrequests already queued or in flight: the ranker is "
                    "overloaded (send fewer requests, or raise max_in_flight_per_connection)"
                )
            )
            return future
        future.add_done_callback(self._finished)
        if self.config.mode == "shared":
            thread = self._threads[next(self._thread_round_robin) % len(self._threads)]
        else:
            thread = self._threads[conn.owner]
        thread.submit(conn, request, future)
        return future

    def _finished(self, future: Future[np.ndarray]) -> None:
        with self._outstanding_lock:
            self._outstanding -= 1

    def connected(self) -> list[bool]:
        return [any(c.alive for c in conns) for conns in self._by_server]

    def stats(self) -> dict[str, Any]:
        config = self.config
        return {
            "engine": {
                "mode": config.mode,
                "io_threads": len(self._threads),
                "credits": config.credits,
                "migration": self.policy is not None,
                "migrations": self.migrations,
                "outstanding": self._outstanding,
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
                    "connected": any(c.alive for c in conns),
                    "subrequests": sum(c.stats.subrequests for c in conns),
                    "bytes_sent": sum(c.stats.bytes_sent for c in conns),
                    "bytes_received": sum(c.stats.bytes_received for c in conns),
                    "failures": sum(c.stats.failures for c in conns),
                    "credit_waits": sum(c.credits.waits for c in conns if c.credits is not None),
                    "control_grants": control.grants if (control := self._control[server]) else 0,
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
        if control is not None:
            return control.server_stats()
        control = self._open_control(server)  # piggyback mode: a control connection just to ask
        try:
            return control.server_stats()
        finally:
            control.close()

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
        self._threads[conn.owner].post(("release", conn, target))
        self.migrations += 1

    def set_endpoint(self, server: int, endpoint: Endpoint) -> None:
        """`server` now listens at `endpoint` (restarted elsewhere, e.g. by Ray): connections that
        went down reconnect there."""
        self.endpoints = (*self.endpoints[:server], endpoint, *self.endpoints[server + 1 :])
        for conn in self._by_server[server]:
            conn.endpoint = endpoint

    def _supervise(self) -> None:
        interval = self.config.migration_interval_s
        ticks_per_reconnect = max(1, round(self.config.reconnect_interval_s / interval))
        for tick in itertools.count():
            if self._closed.wait(interval):
                return
            if self.policy is not None:
                queued = {c.cid: len(c.pending) for c in self._connections if c.alive}
                move = self.policy.observe(queued, self.owners())
                if move is not None:
                    log.debug("migrating connection %d: thread %d -> %d", *vars(move).values())
                    self.migrate(move.connection, move.target)
            if tick % ticks_per_reconnect == 0:
                self._reconnect()

    def _reconnect(self) -> None:
        for server, control in enumerate(self._control):
            if control is not None and not control.alive:
                try:
                    self._control[server] = self._open_control(server)
                    control.close()
                except (OSError, ProtocolError):
                    continue
        for conn in self._connections:
            if conn.alive or self._closed.is_set():
                continue
            try:
                sock = self._open(conn)
            except (OSError, LookupFailed, ProtocolError) as exc:
                conn.last_error = str(exc)
                continue
            log.info("reconnected connection %d to embedding server %d", conn.cid, conn.server)
            owner = 0 if self.config.mode == "shared" else conn.owner
            self._threads[owner].post(("attach", conn, sock))
