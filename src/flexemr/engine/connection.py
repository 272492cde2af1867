"""One data connection to an embedding server: non-blocking, pipelined, owned by one I/O thread.

Sending: a lookup is framed (`encode`: header bytes plus memoryviews of the arrays, no copy) and
appended to the outgoing queue; `flush` writes as much as the socket takes with `sendmsg`, and a
partial send resumes where it stopped on the next writable event. Receiving: an incremental parser
reads the header, then the descriptors, then each buffer straight into an array allocated for it
(after the limits are checked), or, for a result of the shape asked for, into the lookup's `out`
(the ranker's one buffer for a batch's answers), across as many readable events as it takes.
Answers are matched to their futures by request id, so any number of subrequests can be in flight.

Ownership: only the owning thread calls these methods, so there is no lock. With `debug` on, every
socket operation checks that the calling thread is the owner. (The `shared` baseline,
`shared.SharedIoEngine`, calls them from any thread, under a lock of its own per connection.)
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from flexemr.config import Endpoint, FrameLimits
from flexemr.engine.credits import CreditLedger
from flexemr.engine.stats import ConnectionStats
from flexemr.protocol.answers import Stale, SubrequestRefused, answer_or_raise
from flexemr.protocol.frames import (
    DESCRIPTOR,
    HEADER,
    MAX_QUEUED_RESPONSES,
    Flags,
    Frame,
    MessageType,
    ProtocolError,
    encode,
    parse_descriptors,
    parse_header,
)
from flexemr.stats import Count
from flexemr.transport.base import LookupRequest, ServerUnavailable

WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)

PIGGYBACK_WINDOW = MAX_QUEUED_RESPONSES
"""Piggyback mode: the most subrequests in flight on one connection. Credits ride behind lookups,
so a server whose answer queue is full (it stops reading) would never see them: keeping no more
in flight than that queue holds means it never fills. The rest wait here, in `backlog`."""


class OwnershipError(AssertionError):
    """A connection was touched by a thread that does not own it (debug mode)."""


@dataclass
class Pending:
    future: Future[np.ndarray]
    shape: tuple[int, int]
    out: np.ndarray | None
    """Where the answer's values are received (`LookupRequest.out`), or None."""


class Connection:
    def __init__(
        self,
        cid: int,
        server: int,
        endpoint: Endpoint,
        dim: int,
        limits: FrameLimits,
        credits: CreditLedger | None,
        piggyback: bool,
        debug: bool,
    ) -> None:
        self.cid = cid
        self.server = server
        self.endpoint = endpoint
        self.dim = dim
        self.limits = limits
        self.credits = credits
        self.piggyback = piggyback
        self.debug = debug
        self.owner = 0
        """Index of the I/O thread that owns this connection."""
        self.owner_ident: int | None = None
        """Thread id of the owner, set when it adopts the connection; checked in debug mode."""
        self.sock: socket.socket | None = None
        self.tls = False
        self.last_sent = 0.0
        """time.monotonic() of the last bytes sent (keepalive)."""
        self.last_error = "not connected yet"
        self.pending: dict[int, Pending] = {}
        self.stats = ConnectionStats()
        self._next_id = 1
        self._out: deque[memoryview] = deque()
        self.backlog: deque[tuple[LookupRequest, Future[np.ndarray]]] = deque()
        self._reset_parser()

    # -- life cycle ---------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.sock is not None

    def attach(self, sock: socket.socket) -> None:
        """Install a connected socket (at start, or after a reconnect), owned by the caller."""
        self.check_owner()
        sock.setblocking(False)
        self.sock = sock
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.last_sent = time.monotonic()
        self._out.clear()
        self._reset_parser()
        if self.credits is not None:
            self.credits.reset()

    def fail(self, reason: str) -> None:
        """Close the socket and fail everything in flight on it at once with `ServerUnavailable`."""
        self.check_owner()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.last_error = reason
        pending, self.pending = self.pending, {}
        futures = [entry.future for entry in pending.values()] + [f for _, f in self.backlog]
        self.backlog.clear()
        self._out.clear()
        error = ServerUnavailable(self.server, str(self.endpoint), reason)
        for future in futures:
            if not future.done():
                future.set_exception(error)

    # -- ownership ------------------------------------------------------------------------------------

    def check_owner(self) -> None:
        if self.debug and self.owner_ident is not None and self.owner_ident != threading.get_ident():
            raise OwnershipError(
                f"connection {self.cid} (server {self.server}) owned by thread {self.owner_ident} "
                f"was touched by thread {threading.get_ident()} ({threading.current_thread().name})"
            )

    # -- sending --------------------------------------------------------------------------------------

    def queue_lookup(self, request: LookupRequest, future: Future[np.ndarray]) -> None:
        if self.piggyback and (self.backlog or len(self.pending) >= PIGGYBACK_WINDOW):
            self.backlog.append((request, future))
            return
        self._frame_lookup(request, future)

    def _frame_lookup(self, request: LookupRequest, future: Future[np.ndarray]) -> None:
        request_id = self._next_id
        self._next_id += 1
        flags = Flags.RAW if request.raw else Flags.NONE
        buffers = [request.rows, request.offsets]
        if request.weights is not None:
            flags |= Flags.WEIGHTED
            buffers.append(request.weights)
        if request.version is not None:
            flags |= Flags.VERSIONED
            buffers.append(np.array([request.version], dtype=np.int64))
        if self.piggyback and self.credits is not None and self.credits.owed:
            flags |= Flags.CREDIT
            buffers.append(np.array([self.credits.take(), time.monotonic_ns()], dtype=np.int64))
        shape, out = request.expected_shape(self.dim), request.out
        if out is not None and (out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous):
            out = None  # not a buffer the answer fits: it gets an array of its own
        self.pending[request_id] = Pending(future, shape, out)
        self._out.extend(v for v in encode(MessageType.LOOKUP, request_id, buffers, flags) if v.nbytes)
        self.stats.subrequests += 1

    def queue_ping(self) -> None:
        """A keepalive on an idle connection (the server's idle timeout); never answered."""
        self._out.extend(encode(MessageType.PING, 0, []))

    def queue_credit(self, n: int) -> None:
        """A bare CREDIT frame on this connection (piggyback mode with nothing to ride on)."""
        grant = np.array([n, time.monotonic_ns()], dtype=np.int64)
        self._out.extend(encode(MessageType.CREDIT, 0, [grant]))

    @property
    def wants_write(self) -> bool:
        return bool(self._out)

    def flush(self) -> int:
        """Send what the socket takes now; return the bytes sent. Raises OSError if it broke."""
        self.check_owner()
        assert self.sock is not None
        total = 0
        out = self._out
        while out:
            try:
                if self.tls:  # no sendmsg over TLS
                    sent = self.sock.send(out[0])
                else:
                    sent = self.sock.sendmsg(list(out) if len(out) <= 64 else [out[i] for i in range(64)])
            except WOULD_BLOCK:
                break
            total += sent
            while out and sent >= out[0].nbytes:
                sent -= out[0].nbytes
                out.popleft()
            if sent:
                out[0] = out[0][sent:]
                if not self.tls:
                    break  # the socket buffer is full (TLS sends one record at a time)
        self.stats.bytes_sent += total
        if total:
            self.last_sent = time.monotonic()
        return total

    # -- receiving ------------------------------------------------------------------------------------

    def _reset_parser(self) -> None:
        self._stage = 0
        self._header = bytearray(HEADER.size)
        self._target = memoryview(self._header)
        self._got = 0
        self._frame: tuple[MessageType, int, int, int, int] | None = None
        self._arrays: list[np.ndarray] = []
        self._todo: list[np.ndarray] = []

    def read(self) -> int:
        """Read what has arrived, completing frames; return how many responses were completed.
        Raises OSError (ConnectionError) when the peer closed, ProtocolError on a bad frame."""
        self.check_owner()
        assert self.sock is not None
        done = 0
        while True:
            if self._got < self._target.nbytes:
                try:
                    n = self.sock.recv_into(self._target[self._got :])
                except WOULD_BLOCK:
                    return done
                if n == 0:
                    raise ConnectionResetError("connection closed by the server")
                self._got += n
                self.stats.bytes_received += n
                if self._got < self._target.nbytes and not self.tls:
                    return done  # TLS may hold decrypted bytes the selector cannot see: read on
            if self._advance():
                done += 1

    def _advance(self) -> bool:
        """The current target is full: move the parser on; True when a frame completed."""
        if self._stage == 0:
            self._frame = parse_header(self._header, self.limits)
            self._stage = 1
            self._set_target(memoryview(bytearray(DESCRIPTOR.size * self._frame[3])))
        elif self._stage == 1:
            assert self._frame is not None
            kind, _, request_id, count, body = self._frame
            shapes = parse_descriptors(self._target.obj, count, body, self.limits)  # type: ignore[arg-type]
            entry = self.pending.get(request_id)
            if (
                entry is not None
                and entry.out is not None
                and kind == MessageType.RESULT
                and shapes == [(np.dtype(np.float32), entry.shape)]
            ):
                self._arrays = [entry.out]  # the values go straight into the caller's buffer
            else:
                self._arrays = [np.empty(shape, dtype=dtype) for dtype, shape in shapes]
            self._todo = list(reversed(self._arrays))
            self._stage = 2
            self._next_buffer()
        else:
            self._next_buffer()
        if self._stage == 3:
            assert self._frame is not None
            kind, flags, request_id, _, _ = self._frame
            arrays = self._arrays
            self._reset_parser()
            self._deliver(Frame(kind, request_id, flags, arrays))
            return True
        return False

    def _set_target(self, view: memoryview) -> None:
        self._target = view
        self._got = 0

    def _next_buffer(self) -> None:
        while self._todo:
            array = self._todo.pop()
            if array.nbytes:
                self._set_target(array.data.cast("B"))
                return
        self._stage = 3
        self._set_target(memoryview(b""))

    def _deliver(self, frame: Frame) -> None:
        entry = self.pending.pop(frame.request_id, None)
        if entry is None:
            raise ProtocolError(f"answer to unknown request id {frame.request_id}")
        self.stats.responses += 1
        if self.credits is not None:
            self.credits.on_response()
        if not entry.future.cancelled():
            try:
                values = self._values(answer_or_raise(frame, MessageType.RESULT, self.server), entry)
            except Stale as exc:  # not a failure: the server is at another version than asked
                entry.future.set_exception(exc)
            except SubrequestRefused as exc:
                self.stats.failures += 1
                entry.future.set_exception(exc)
            else:
                entry.future.set_result(values)
        if self.credits is not None:
            self.credits.on_delivered()
        if self.backlog:
            self._frame_lookup(*self.backlog.popleft())

    def _values(self, frame: Frame, entry: Pending) -> np.ndarray:
        """The values of a RESULT, checked to be the float32 array of the shape the lookup asked for."""
        values = frame.buffers[0] if len(frame.buffers) == 1 else None
        if values is None or values.shape != entry.shape or values.dtype != np.float32:
            found = "no single array" if values is None else f"{values.dtype} {values.shape}"
            raise SubrequestRefused(
                f"embedding server {self.server}: a result of {found}, expected float32 {entry.shape}"
            )
        return values

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "connection": self.cid,
            "server": self.server,
            "owner": self.owner,
            "connected": self.alive,
            "in_flight": len(self.pending),
            "backlog": len(self.backlog),
            **self.stats.as_dict(),
        }
        if self.credits is not None:
            c = self.credits
            out["credits"] = {
                "capacity": c.capacity,
                "granted": Count(c.granted),
                "received": Count(c.received),
                "owed": c.owed,
                "waits": Count(c.waits),
                "violations": Count(c.violations),
            }
        return out
