"""Credit-based flow control, ranker side: the ledger of one data connection, and the control channel.

A data connection has a response queue of `capacity` slots. The ranker grants the server one
credit per free slot; the server sends one response per credit and holds the rest back (bounded).
So at any time `granted - received` credits are out at the server, `received - delivered` slots are
busy and `owed` freed slots wait to be granted again, and these add up to `capacity`.

Grants travel in one of two ways (`EngineConfig.credits`):
- `priority`: on the control connection of (ranker, server) (it always exists: it carries the
  heartbeat), marked high priority with IP_TOS (DSCP EF) and SO_PRIORITY, so a grant never queues
  behind megabytes of responses;
- `piggyback`: inside the next LOOKUP on the same data connection (flag CREDIT and one extra
  buffer), or in a bare CREDIT frame when the server may be waiting and nothing else is going out.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import select
import socket
import ssl
import threading
import time
from concurrent.futures import Future
from typing import Any

import numpy as np

from flexemr.config import FrameLimits
from flexemr.engine.health import ServerHealth
from flexemr.protocol.answers import LookupFailed, answer_or_raise
from flexemr.protocol.frames import Flags, MessageType, ProtocolError, encode, recv_frame, send_frame

log = logging.getLogger(__name__)

DSCP_EF_TOS = 0xB8
"""IP_TOS byte for DSCP Expedited Forwarding (46 << 2)."""
CONTROL_SO_PRIORITY = 6
"""The highest SO_PRIORITY an unprivileged process may set."""


class CreditLedger:
    """Credits of one data connection (pure bookkeeping, touched by the owning thread only)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"credit capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.granted = capacity
        """Credits granted so far (the first `capacity` in the HELLO)."""
        self.received = 0
        self.owed = 0
        self.waits = 0
        """Times the server held a response for want of credits (as far as the ranker can tell)."""
        self.violations = 0
        """Responses received beyond the credits granted: must stay 0."""

    @property
    def at_server(self) -> int:
        return self.granted - self.received

    def on_response(self) -> None:
        self.received += 1
        if self.received > self.granted:
            self.violations += 1

    def on_delivered(self) -> None:
        """The response left its slot (its future is resolved): the slot may be granted again."""
        self.owed += 1

    def due(self, in_flight: int) -> int:
        """Credits to grant now: in batches of a quarter of the capacity, or at once when the
        server holds responses it has no credit for."""
        starved = in_flight > self.at_server
        if starved:
            self.waits += 1
        if self.owed and (starved or self.owed >= max(1, self.capacity // 4)):
            return self.take()
        return 0

    def take(self) -> int:
        n, self.owed = self.owed, 0
        self.granted += n
        return n

    def reset(self) -> None:
        """A fresh connection: the server starts again from `capacity` credits."""
        self.granted, self.received, self.owed = self.capacity, 0, 0


def mark_high_priority(sock: socket.socket) -> None:
    """DSCP EF and the highest unprivileged SO_PRIORITY; where the OS refuses, carry on unmarked."""
    for level, option, value in (
        (socket.IPPROTO_IP, socket.IP_TOS, DSCP_EF_TOS),
        (socket.SOL_SOCKET, getattr(socket, "SO_PRIORITY", None), CONTROL_SO_PRIORITY),
    ):
        if option is None:
            continue
        try:
            sock.setsockopt(level, option, value)
        except OSError as exc:
            log.info("could not mark the control channel high priority: %s", exc)


class ControlChannel:
    """The control connection to one server, driven by its own thread: I/O threads `grant`
    credits, and the thread pings the server every `interval_s` (the heartbeat `health` reads).

    One thread does all the socket work (TLS sockets must not be read and written at once from
    two threads); it wakes at least every `interval_s` to ping and to read the answers."""

    def __init__(
        self, server: int, sock: socket.socket, limits: FrameLimits, health: ServerHealth, interval_s: float
    ) -> None:
        self.server = server
        self._sock = sock
        self._limits = limits
        self.health = health
        self._interval = interval_s
        self._queue: queue.Queue[tuple[int, int] | Future[dict[str, Any]] | None] = queue.Queue()
        self._stats: dict[int, Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self.grants = 0
        self.frames = 0
        self.alive = True
        self.error = ""
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"flexemr-control-{server}")
        self._thread.start()

    def grant(self, connection: int, n: int) -> None:
        self._queue.put((connection, n))

    def server_stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """The server's view of this session's credits (a PING with flag STATS)."""
        future: Future[dict[str, Any]] = Future()
        self._queue.put(future)
        return future.result(timeout)

    def _run(self) -> None:
        next_ping = 0.0
        try:
            while True:
                now = time.monotonic()
                if now >= next_ping:
                    self.health.pinged(now)
                    send_frame(self._sock, encode(MessageType.PING, next(self._ids), []))
                    next_ping = now + self._interval
                try:
                    item = self._queue.get(timeout=max(0.0, next_ping - time.monotonic()))
                except queue.Empty:
                    pass
                else:
                    if item is None:
                        return
                    if isinstance(item, Future):
                        request_id = next(self._ids)
                        self._stats[request_id] = item
                        send_frame(self._sock, encode(MessageType.PING, request_id, [], Flags.STATS))
                    else:
                        self._send_grants(item)
                looked_at = time.monotonic()
                self._read_answers()
                self.health.looked(looked_at)
        except (OSError, ValueError, ProtocolError, LookupFailed) as exc:
            self.error = f"control connection failed: {exc}"
            log.warning("control channel to embedding server %d failed: %s", self.server, exc)
        finally:
            self.alive = False
            for future in self._stats.values():
                future.set_exception(ConnectionError(self.error or "control channel closed"))

    def _send_grants(self, first: tuple[int, int]) -> None:
        grants = {first[0]: first[1]}
        while True:  # coalesce whatever else is waiting into the same frame
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                break
            if not isinstance(more, tuple):
                self._queue.put(more)
                break
            grants[more[0]] = grants.get(more[0], 0) + more[1]
        ids = np.fromiter(grants.keys(), dtype=np.int64, count=len(grants))
        counts = np.fromiter(grants.values(), dtype=np.int64, count=len(grants))
        sent_at = np.array([time.monotonic_ns()], dtype=np.int64)
        send_frame(self._sock, encode(MessageType.CREDIT, 0, [ids, counts, sent_at]))
        self.grants += int(counts.sum())
        self.frames += 1

    def _read_answers(self) -> None:
        """Read the PONGs that have arrived (whole frames: the server writes each at once)."""
        while _readable(self._sock):
            frame = answer_or_raise(recv_frame(self._sock, self._limits), MessageType.PONG, self.server)
            if self.health.answered():
                log.info("embedding server %d answers heartbeats again", self.server)
            future = self._stats.pop(frame.request_id, None)
            if future is not None:
                future.set_result(json.loads(frame.buffers[0].tobytes()) if frame.buffers else {})

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)
        self._sock.close()


def _readable(sock: socket.socket) -> bool:
    """Bytes can be read now: buffered by TLS, or waiting in the socket; a UCX link
    (`protocol.ucx_stream`, no socket underneath) says so itself with `pending`."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    if isinstance(sock, socket.socket):
        poll = select.poll()  # not select(): it fails on descriptors over 1024
        poll.register(sock, select.POLLIN)
        return bool(poll.poll(0))
    return bool(sock.pending())
