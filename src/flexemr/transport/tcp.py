"""The simple TCP transport: one connection per embedding server, pipelined.

Senders write frames under a per-connection lock; one reader thread per connection matches
answers to futures by request id, so many subrequests can be in flight on one connection. When a
connection drops, every subrequest in flight on it fails at once with `ServerUnavailable`, and a
monitor thread reconnects in the background.
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
import threading
from concurrent.futures import Future
from typing import Any

import numpy as np

from flexemr.config import Endpoint
from flexemr.protocol.frames import (
    ConnectionClosed,
    Flags,
    FrameLimits,
    MessageType,
    ProtocolError,
    encode,
    error_text,
    recv_frame,
    send_frame,
)
from flexemr.stats import Count
from flexemr.transport.base import LookupFailed, LookupRequest, ServerUnavailable

log = logging.getLogger(__name__)


def lookup_frame(request_id: int, request: LookupRequest) -> list[memoryview]:
    flags = Flags.RAW if request.raw else Flags.NONE
    buffers = [request.rows, request.offsets]
    if request.weights is not None:
        flags |= Flags.WEIGHTED
        buffers.append(request.weights)
    return encode(MessageType.LOOKUP, request_id, buffers, flags)


def handshake(
    sock: socket.socket,
    server: int,
    expected_rows: int,
    dim: int,
    limits: FrameLimits,
    options: dict[str, Any] | None = None,
) -> None:
    """Say HELLO (with the client's `options`, if any) and check the peer is the server the plan
    expects, holding the rows the plan gives it."""
    payload = [np.frombuffer(json.dumps(options).encode(), dtype=np.uint8)] if options else []
    send_frame(sock, encode(MessageType.HELLO, 0, payload))
    reply = recv_frame(sock, limits)
    info = json.loads(reply.buffers[0].tobytes()) if reply.buffers else {}
    actual = (info.get("server"), info.get("rows"), info.get("dim"))
    if reply.type != MessageType.HELLO or actual != (server, expected_rows, dim):
        raise LookupFailed(
            f"server at {sock.getpeername()} says it is (server, rows, dim) = {actual}, "
            f"but the plan expects {(server, expected_rows, dim)}: is the cluster spec the same everywhere?"
        )


class _Connection:
    def __init__(
        self, server: int, endpoint: Endpoint, expected_rows: int, dim: int, limits: FrameLimits
    ) -> None:
        self.server = server
        self.endpoint = endpoint
        self.expected_rows = expected_rows
        self.dim = dim
        self.limits = limits
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._pending: dict[int, tuple[Future[np.ndarray], tuple[int, int]]] = {}
        self._ids = itertools.count(1)
        self.last_error = "not connected yet"
        self.sent = self.received = self.bytes_sent = self.bytes_received = self.failures = 0

    @property
    def alive(self) -> bool:
        return self._sock is not None

    def connect(self, timeout: float) -> None:
        sock = socket.create_connection((self.endpoint.host, self.endpoint.port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handshake(sock, self.server, self.expected_rows, self.dim, self.limits)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        with self._state_lock:
            self._sock = sock
        threading.Thread(target=self._read, args=(sock,), daemon=True, name=f"reader-{self.server}").start()

    def submit(self, request: LookupRequest) -> Future[np.ndarray]:
        future: Future[np.ndarray] = Future()
        with self._state_lock:
            sock = self._sock
            if sock is None:
                raise ServerUnavailable(self.server, str(self.endpoint), self.last_error)
            request_id = next(self._ids)
            self._pending[request_id] = (future, request.expected_shape(self.dim))
        frame = lookup_frame(request_id, request)
        try:
            with self._send_lock:
                send_frame(sock, frame)
        except OSError as exc:
            self._drop(sock, f"send failed: {exc}")
        self.sent += 1
        self.bytes_sent += sum(v.nbytes for v in frame)
        return future

    def _read(self, sock: socket.socket) -> None:
        reason = "connection closed by the server"
        try:
            while True:
                frame = recv_frame(sock, self.limits)
                with self._state_lock:
                    entry = self._pending.pop(frame.request_id, None)
                if entry is None:
                    raise ProtocolError(f"answer to unknown request id {frame.request_id}")
                future, shape = entry
                self.received += 1
                self.bytes_received += sum(b.nbytes for b in frame.buffers) + 24
                if frame.type == MessageType.ERROR:
                    self.failures += 1
                    future.set_exception(LookupFailed(error_text(frame)))
                elif frame.type != MessageType.RESULT or len(frame.buffers) != 1:
                    future.set_exception(LookupFailed(f"unexpected {frame.type.name} frame"))
                elif frame.buffers[0].shape != shape or frame.buffers[0].dtype != np.float32:
                    future.set_exception(
                        LookupFailed(f"result of shape {frame.buffers[0].shape}, expected {shape}")
                    )
                else:
                    future.set_result(frame.buffers[0])
        except ProtocolError as exc:
            reason = f"malformed frame from server: {exc}"
            log.error("embedding server %d at %s: %s", self.server, self.endpoint, reason)
        except (ConnectionClosed, OSError) as exc:
            reason = f"connection lost: {exc}"
        self._drop(sock, reason)

    def _drop(self, sock: socket.socket, reason: str, expected: bool = False) -> None:
        """Mark the connection down and fail everything in flight on it: never wait forever."""
        with self._state_lock:
            if self._sock is not sock:
                return
            self._sock = None
            self.last_error = reason
            pending, self._pending = self._pending, {}
        sock.close()
        level = logging.INFO if expected else logging.WARNING
        log.log(level, "embedding server %d at %s went down: %s", self.server, self.endpoint, reason)
        for future, _ in pending.values():
            future.set_exception(ServerUnavailable(self.server, str(self.endpoint), reason))

    def close(self) -> None:
        with self._state_lock:
            sock = self._sock
        if sock is not None:
            self._drop(sock, "transport closed", expected=True)


class TcpTransport:
    """`LookupTransport` over one pipelined TCP connection per server."""

    def __init__(
        self,
        endpoints: tuple[Endpoint, ...],
        server_rows: list[int],
        dim: int,
        limits: FrameLimits | None = None,
        reconnect_interval_s: float = 0.5,
    ) -> None:
        limits = limits or FrameLimits()
        self._connections = [
            _Connection(i, e, rows, dim, limits)
            for i, (e, rows) in enumerate(zip(endpoints, server_rows, strict=True))
        ]
        self._closed = threading.Event()
        self._interval = reconnect_interval_s
        self._monitor = threading.Thread(target=self._reconnect_loop, daemon=True, name="reconnect")

    def start(self, timeout: float = 30.0) -> None:
        """Connect to every server, waiting up to `timeout` for them to come up."""
        deadline = threading.Event()
        timer = threading.Timer(timeout, deadline.set)
        timer.start()
        try:
            for conn in self._connections:
                while not conn.alive:
                    try:
                        conn.connect(timeout=2.0)
                    except OSError as exc:
                        conn.last_error = str(exc)
                        if deadline.wait(0.1):
                            raise ServerUnavailable(conn.server, str(conn.endpoint), str(exc)) from exc
        finally:
            timer.cancel()
        self._monitor.start()

    def _reconnect_loop(self) -> None:
        while not self._closed.wait(self._interval):
            for conn in self._connections:
                if not conn.alive:
                    try:
                        conn.connect(timeout=1.0)
                        log.info("reconnected to embedding server %d at %s", conn.server, conn.endpoint)
                    except (OSError, LookupFailed, ProtocolError) as exc:
                        conn.last_error = str(exc)

    def submit(self, server: int, request: LookupRequest) -> Future[np.ndarray]:
        return self._connections[server].submit(request)

    def connected(self) -> list[bool]:
        return [c.alive for c in self._connections]

    def stats(self) -> dict[str, Any]:
        return {
            "servers": [
                {
                    "server": c.server,
                    "connected": c.alive,
                    "subrequests": Count(c.sent),
                    "bytes_sent": Count(c.bytes_sent),
                    "bytes_received": Count(c.bytes_received),
                    "failures": Count(c.failures),
                }
                for c in self._connections
            ]
        }

    def close(self) -> None:
        self._closed.set()
        for conn in self._connections:
            conn.close()
