"""The embedding server process: holds its shards and answers lookup subrequests over TCP.

One thread per connection reads frames, runs the lookup kernel (which releases the GIL, so
connections use the cores in parallel) and writes the answer. A bad subrequest gets an ERROR frame
and the connection lives on; a malformed frame closes that connection only, with its reason logged.

Credit-based flow control (the ranker's I/O engine asks for it in its HELLO): a credited data
connection sends a response only against a credit; answers beyond the credits wait in a bounded
queue, and when that is full the connection stops reading (TCP pushes back on the ranker). Credits
arrive on a control connection of the same session (CREDIT frames naming the data connection), or
piggybacked on the data connection itself (LOOKUP flag CREDIT, or a bare CREDIT frame).
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from flexemr.config import Endpoint
from flexemr.embedding_server.store import BadSubrequest, ShardStore
from flexemr.protocol.frames import (
    ConnectionClosed,
    Flags,
    Frame,
    FrameLimits,
    MessageType,
    ProtocolError,
    encode,
    error_frame,
    recv_frame,
    send_frame,
)

log = logging.getLogger(__name__)

MAX_QUEUED_RESPONSES = 256
"""Answers a credited connection holds back for want of credits before it stops reading."""


class CreditGate:
    """Response credits of one data connection: `take` blocks until one is granted."""

    def __init__(self, initial: int) -> None:
        self._cond = threading.Condition()
        self._credits = initial
        self._closed = False
        self.granted = initial
        self.sent = 0
        self.waits = 0

    def grant(self, n: int) -> None:
        with self._cond:
            self._credits += n
            self.granted += n
            self._cond.notify()

    def take(self) -> bool:
        """Spend one credit (False once closed)."""
        with self._cond:
            if self._credits <= 0:
                self.waits += 1
            while self._credits <= 0 and not self._closed:
                self._cond.wait()
            if self._closed:
                return False
            self._credits -= 1
            self.sent += 1
            assert self.sent <= self.granted, "sent a response without a credit"
            return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class EmbeddingServer:
    def __init__(self, store: ShardStore, endpoint: Endpoint, limits: FrameLimits | None = None) -> None:
        self.store = store
        self.limits = limits or FrameLimits()
        self._listener = socket.create_server((endpoint.host, endpoint.port), backlog=128)
        self.endpoint = Endpoint(endpoint.host, self._listener.getsockname()[1])
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sessions: dict[str, dict[int, CreditGate]] = {}
        self._credit_latencies: dict[str, deque[int]] = {}
        """Per session, grant-to-arrival times of recent credits (meaningful with same-host clocks)."""

    def serve_forever(self) -> None:
        while not self._closed.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError:
                break
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._connections.add(conn)
            threading.Thread(target=self._serve_connection, args=(conn, peer), daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept()
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for conn in self._connections:
                conn.close()
            for gates in self._sessions.values():
                for gate in gates.values():
                    gate.close()

    def _serve_connection(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            frame = recv_frame(conn, self.limits)
            options = _hello_options(frame)
            send_frame(conn, self.answer(frame))
            if "credits" in options:
                self._serve_credited(conn, str(options["session"]), int(options["conn"]), options)
            elif options.get("control"):
                self._serve_control(conn, str(options["session"]))
            else:
                while True:
                    frame = recv_frame(conn, self.limits)
                    send_frame(conn, self.answer(frame))
        except ProtocolError as exc:
            log.warning("closing connection from %s:%s: malformed frame: %s", *peer[:2], exc)
        except (ConnectionClosed, OSError, ValueError, KeyError):
            pass
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _serve_credited(self, conn: socket.socket, session: str, index: int, options: dict[str, Any]) -> None:
        """Read and answer lookups; a writer thread sends the answers as credits allow."""
        gate = CreditGate(int(options["credits"]))
        with self._lock:
            self._sessions.setdefault(session, {})[index] = gate
        answers: queue.Queue[list[memoryview] | None] = queue.Queue(MAX_QUEUED_RESPONSES)
        writer = threading.Thread(target=self._write_credited, args=(conn, gate, answers), daemon=True)
        writer.start()
        try:
            while True:
                frame = recv_frame(conn, self.limits)
                if frame.type == MessageType.CREDIT:
                    self._piggybacked(session, gate, frame.buffers[0] if frame.buffers else None)
                    continue
                if frame.type == MessageType.LOOKUP and frame.flags & Flags.CREDIT and frame.buffers:
                    self._piggybacked(session, gate, frame.buffers.pop())
                    frame.flags &= ~Flags.CREDIT
                answer = self.answer(frame)
                while not self._closed.is_set():
                    try:
                        answers.put(answer, timeout=0.5)
                        break
                    except queue.Full:
                        continue
        finally:
            with self._lock:
                self._sessions.get(session, {}).pop(index, None)
            gate.close()
            try:
                answers.put_nowait(None)
            except queue.Full:
                pass
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            writer.join()

    def _piggybacked(self, session: str, gate: CreditGate, grant: np.ndarray | None) -> None:
        """A grant on a data connection: int64 [credits] or [credits, sent at monotonic_ns]."""
        if grant is None or grant.dtype != np.int64 or grant.size < 1:
            raise ProtocolError("a piggybacked credit is int64 [credits] or [credits, sent at ns]")
        gate.grant(int(grant[0]))
        if grant.size > 1:
            self._latencies(session).append(time.monotonic_ns() - int(grant[1]))

    def _latencies(self, session: str) -> deque[int]:
        with self._lock:
            return self._credit_latencies.setdefault(session, deque(maxlen=4096))

    def _write_credited(
        self, conn: socket.socket, gate: CreditGate, answers: queue.Queue[list[memoryview] | None]
    ) -> None:
        try:
            while (answer := answers.get()) is not None and gate.take():
                send_frame(conn, answer)
        except OSError:
            pass

    def _serve_control(self, conn: socket.socket, session: str) -> None:
        """Apply CREDIT frames to the session's data connections; answer PING with credit stats."""
        while True:
            frame = recv_frame(conn, self.limits)
            if frame.type == MessageType.CREDIT and len(frame.buffers) == 3:
                self._latencies(session).append(time.monotonic_ns() - int(frame.buffers[2][0]))
                with self._lock:
                    gates = self._sessions.get(session, {})
                    for index, n in zip(frame.buffers[0].tolist(), frame.buffers[1].tolist(), strict=True):
                        if index in gates:
                            gates[index].grant(n)
            elif frame.type == MessageType.PING:
                send_frame(
                    conn, encode(MessageType.PONG, frame.request_id, [_json(self.credit_stats(session))])
                )
            else:
                send_frame(conn, self.answer(frame))

    def credit_stats(self, session: str) -> dict[str, Any]:
        with self._lock:
            gates = dict(self._sessions.get(session, {}))
        latencies = list(self._latencies(session))
        return {
            "connections": {
                i: {"granted": g.granted, "sent": g.sent, "waits": g.waits} for i, g in gates.items()
            },
            "credit_latency_ns": latencies,
        }

    def answer(self, frame: Frame) -> list[memoryview]:
        """The reply to one well-formed frame."""
        if frame.type == MessageType.LOOKUP:
            try:
                return encode(MessageType.RESULT, frame.request_id, [self._lookup(frame)])
            except BadSubrequest as exc:
                return error_frame(frame.request_id, f"embedding server {self.store.server}: {exc}")
        if frame.type == MessageType.HELLO:
            info = {"server": self.store.server, "rows": self.store.num_rows, "dim": self.store.dim}
            return encode(MessageType.HELLO, frame.request_id, [_json(info)])
        if frame.type == MessageType.PING:
            return encode(MessageType.PONG, frame.request_id, [])
        return error_frame(frame.request_id, f"unexpected message type {frame.type.name}")

    def _lookup(self, frame: Frame) -> np.ndarray:
        weighted = bool(frame.flags & Flags.WEIGHTED)
        index = frame.buffers[0].dtype if frame.buffers else None
        expected = (index, index, np.float32)[: 3 if weighted else 2]
        if (
            index not in (np.int32, np.int64)
            or len(frame.buffers) != len(expected)
            or any(b.ndim != 1 or b.dtype != d for b, d in zip(frame.buffers, expected, strict=True))
        ):
            raise BadSubrequest(
                "a lookup carries rows and offsets (both int32 or both int64) and optional float32 weights"
            )
        rows, offsets = frame.buffers[0], frame.buffers[1]
        if frame.flags & Flags.RAW:
            return self.store.raw(rows)
        return self.store.pooled(rows, offsets, frame.buffers[2] if weighted else None)


def _json(value: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)


def _hello_options(frame: Frame) -> dict[str, Any]:
    """A HELLO may carry the engine's session options as JSON: credits, session, conn, control."""
    if frame.type != MessageType.HELLO or not frame.buffers:
        return {}
    try:
        options = json.loads(frame.buffers[0].tobytes())
    except ValueError:
        return {}
    return options if isinstance(options, dict) and "session" in options else {}
