"""The embedding server process: holds its shards and answers lookup subrequests over TCP.

One thread per connection reads frames, runs the lookup kernel (which releases the GIL, so
connections use the cores in parallel) and writes the answer. A bad subrequest gets an ERROR frame
and the connection lives on; a malformed frame closes that connection only, with its reason logged.
"""

from __future__ import annotations

import json
import logging
import socket
import threading

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


class EmbeddingServer:
    def __init__(self, store: ShardStore, endpoint: Endpoint, limits: FrameLimits | None = None) -> None:
        self.store = store
        self.limits = limits or FrameLimits()
        self._listener = socket.create_server((endpoint.host, endpoint.port), backlog=128)
        self.endpoint = Endpoint(endpoint.host, self._listener.getsockname()[1])
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()

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
        self._listener.close()
        with self._lock:
            for conn in self._connections:
                conn.close()

    def _serve_connection(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            while True:
                frame = recv_frame(conn, self.limits)
                send_frame(conn, self.answer(frame))
        except ProtocolError as exc:
            log.warning("closing connection from %s:%s: malformed frame: %s", *peer[:2], exc)
        except (ConnectionClosed, OSError):
            pass
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def answer(self, frame: Frame) -> list[memoryview]:
        """The reply to one well-formed frame."""
        if frame.type == MessageType.LOOKUP:
            try:
                return encode(MessageType.RESULT, frame.request_id, [self._lookup(frame)])
            except BadSubrequest as exc:
                return error_frame(frame.request_id, f"embedding server {self.store.server}: {exc}")
        if frame.type == MessageType.HELLO:
            info = {"server": self.store.server, "rows": self.store.num_rows, "dim": self.store.dim}
            payload = np.frombuffer(json.dumps(info).encode(), dtype=np.uint8)
            return encode(MessageType.HELLO, frame.request_id, [payload])
        if frame.type == MessageType.PING:
            return encode(MessageType.PONG, frame.request_id, [])
        return error_frame(frame.request_id, f"unexpected message type {frame.type.name}")

    def _lookup(self, frame: Frame) -> np.ndarray:
        weighted = bool(frame.flags & Flags.WEIGHTED)
        expected = (np.int64, np.int64, np.float32)[: 3 if weighted else 2]
        if len(frame.buffers) != len(expected) or any(
            b.ndim != 1 or b.dtype != d for b, d in zip(frame.buffers, expected, strict=False)
        ):
            raise BadSubrequest("a lookup carries rows int64[n], offsets int64[bags] and optional weights")
        rows, offsets = frame.buffers[0], frame.buffers[1]
        if frame.flags & Flags.RAW:
            return self.store.raw(rows)
        return self.store.pooled(rows, offsets, frame.buffers[2] if weighted else None)
