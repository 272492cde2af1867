"""The lock-sharing baseline (`EngineConfig.mode` `shared`): the naive way to use several I/O threads.

No thread owns a connection: every thread watches every connection in its selector, a subrequest
goes to the threads in turn, and each operation on a connection (send, receive, settle, keepalive,
attach, close) takes that connection's lock. It exists to be measured against the mapping-aware
`IoEngine` (FlexEMR's technique 4 switched off), behind the same interface; it never migrates.

What differs from `IoEngine` is only where threads meet connections:

    IoEngine (mapped, single)                  SharedIoEngine (shared)
    a connection served by its owner           by every thread (each selector watches it)
    Lookup -> the owner's inbox                Lookup -> the next thread's inbox (round robin)
    Fail, Attach -> the owner                  Fail, Attach -> thread 0; then Watch/Unwatch to all
    no lock                                    the connection's lock around every operation
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Sequence

from flexemr.config import EngineMode
from flexemr.engine.connection import Connection
from flexemr.engine.engine import IoEngine
from flexemr.engine.io_thread import GrantSink, IoThread
from flexemr.engine.work import Attach, Fail, Lookup, Stop, Unwatch, Watch, WorkItem


class SharedIoEngine(IoEngine):
    """`IoEngine`'s interface; every I/O thread serves every connection, under per-connection locks."""

    modes: tuple[EngineMode, ...] = ("shared",)

    def _make_threads(self, count: int, grant: GrantSink | None, keepalive_s: float) -> list[IoThread]:
        self._next_thread = itertools.count()
        """Subrequests go to the threads in turn."""
        locks = [threading.Lock() for _ in self._connections]  # by connection id
        threads: list[IoThread] = []
        threads.extend(SharedIoThread(i, threads, locks, grant, keepalive_s) for i in range(count))
        return threads

    def _serve_from_start(self, conn: Connection) -> None:
        """Every thread watches `conn`."""
        for thread in self._threads:
            thread._register(conn)

    def _sender(self, conn: Connection) -> IoThread:
        """The next thread in turn, whichever connection it is."""
        return self._threads[next(self._next_thread) % len(self._threads)]

    def _owner(self, conn: Connection) -> IoThread:
        """Thread 0 (no thread owns a connection): one inbox keeps each connection's Fail and
        Attach in the order they were posted."""
        return self._threads[0]


class SharedIoThread(IoThread):
    """An I/O thread that serves every connection, taking its lock around each operation."""

    def __init__(
        self,
        index: int,
        threads: Sequence[IoThread],
        locks: list[threading.Lock],
        grant: GrantSink | None,
        keepalive_s: float,
    ) -> None:
        super().__init__(index, threads, grant, keepalive_s)
        self._locks = locks

    def _handle(self, item: WorkItem) -> None:
        match item:
            case Lookup(conn, request, future):
                with self._locks[conn.cid]:
                    self._send_lookup(conn, request, future)
            case Attach(conn, sock):
                with self._locks[conn.cid]:
                    conn.attach(sock)
                for thread in self.threads:
                    thread.post(Watch(conn))
            case Fail(conn, reason):
                with self._locks[conn.cid]:
                    if conn.alive:
                        self._fail(conn, reason)
            case Watch(conn):
                self._register(conn)
            case Unwatch(conn):
                self._unregister(conn)
            case Stop():
                self._running = False
            case _:
                raise AssertionError(
                    f"I/O thread {self.index} of the shared baseline cannot carry out {item!r}"
                )

    def _served(self) -> Iterable[Connection]:
        """Every connection this thread's selector watches."""
        return [key.data for key in self._selector.get_map().values() if key.data is not None]

    def _ping_if_idle(self, conn: Connection, now: float) -> None:
        with self._locks[conn.cid]:
            super()._ping_if_idle(conn, now)

    def _on_ready(self, conn: Connection, mask: int) -> None:
        with self._locks[conn.cid]:
            super()._on_ready(conn, mask)

    def _settle_connection(self, conn: Connection) -> None:
        with self._locks[conn.cid]:
            super()._settle_connection(conn)

    def _fail(self, conn: Connection, reason: str) -> None:
        """Under conn's lock: every other thread stops watching it too."""
        for thread in self.threads:
            if thread is not self:
                thread.post(Unwatch(conn))
        super()._fail(conn, reason)
