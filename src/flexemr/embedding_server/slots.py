"""The connection slots of an embedding server, and what a peer holds before it proves the secret.

Every accepted connection takes a slot: at most `limit` in all, of which at most `handshakes` still
in their handshake. When either bound is reached, a new connection takes the slot of the oldest one
still in its handshake, which is shut down:

    slots   [ proven | proven | ... | handshake (oldest) | ... | handshake (newest) ]
    accept  -> full? shut the oldest handshake, append the new one; all proven? refuse the new one

So peers without the secret hold at most `handshakes` slots, each only until newer connections
push it out or its handshake deadline passes, and a ranker that holds the secret always gets in
while its own (proven) connections are fewer than `limit`.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class SlotsFull(Exception):
    """Every slot is held by a connection that has proven the secret."""


class ConnectionSlots:
    def __init__(self, limit: int, handshakes: int) -> None:
        self.limit = limit
        self.handshakes = handshakes
        self._lock = threading.Lock()
        self._handshaking: dict[socket.socket, None] = {}
        """Connections still in their handshake, oldest first."""
        self._proven: set[socket.socket] = set()

    def admit(self, conn: socket.socket) -> str | None:
        """Give `conn` a slot: None when one was free, else why the oldest connection still in its
        handshake was shut to make room. Raises SlotsFull when every slot is proven."""
        with self._lock:
            reason = None
            if len(self._handshaking) >= self.handshakes:
                reason = "handshake slots full"
            elif len(self._handshaking) + len(self._proven) >= self.limit:
                if not self._handshaking:
                    raise SlotsFull(f"{len(self._proven)} authenticated connections held")
                reason = "connection limit"
            if reason is not None:
                self._drop_oldest()
            self._handshaking[conn] = None
            return reason

    def drop_oldest_handshake(self) -> bool:
        """Shut the oldest connection still in its handshake (to free its file descriptor)."""
        with self._lock:
            if not self._handshaking:
                return False
            self._drop_oldest()
            return True

    def replace(self, old: socket.socket, new: socket.socket) -> socket.socket:
        """`new` (`old` wrapped in TLS) takes `old`'s place; if `old` lost its slot meanwhile,
        `new` is shut."""
        with self._lock:
            if old in self._handshaking:
                self._handshaking = {new if c is old else c: None for c in self._handshaking}
            else:
                _shut(new)
            return new

    def prove(self, conn: socket.socket) -> bool:
        """`conn` has proven the secret: its slot is no longer taken by newer connections. False
        if it lost its slot before."""
        with self._lock:
            if conn not in self._handshaking:
                return False
            del self._handshaking[conn]
            self._proven.add(conn)
            return True

    def release(self, conn: socket.socket) -> None:
        """`conn` is done with its slot (its thread closes it)."""
        with self._lock:
            self._handshaking.pop(conn, None)
            self._proven.discard(conn)

    def held(self) -> tuple[int, int]:
        """(connections in their handshake, proven connections)."""
        with self._lock:
            return len(self._handshaking), len(self._proven)

    def shut_all(self) -> None:
        with self._lock:
            for conn in [*self._handshaking, *self._proven]:
                _shut(conn)

    def _drop_oldest(self) -> None:
        oldest = next(iter(self._handshaking))
        del self._handshaking[oldest]
        _shut(oldest)


def _shut(conn: socket.socket) -> None:
    """Wake the connection's thread from its read: it sees the end and closes the socket itself."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
