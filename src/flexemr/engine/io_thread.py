"""One I/O thread: a selectors event loop over the non-blocking connections it owns.

Other threads never touch its connections: they post work items (`work.py`: `Lookup`, `Release`,
`Adopt`, `Attach`, `Fail`, `Stop`) to its inbox (a deque) and wake it through a socketpair (one
byte, only when it may be asleep). An item for a connection this thread no longer owns is forwarded
to the current owner, so a subrequest posted while its connection was changing hands is sent
exactly once, by the new owner.

The `shared` baseline's threads (`shared.SharedIoThread`) run the same loop without ownership.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future

import numpy as np

from flexemr.engine.connection import Connection
from flexemr.engine.stats import ThreadStats
from flexemr.engine.work import Adopt, Attach, Fail, Lookup, Release, Stop, WorkItem
from flexemr.protocol.frames import ProtocolError
from flexemr.transport.base import LookupRequest, ServerUnavailable

log = logging.getLogger(__name__)

GrantSink = Callable[[Connection, int], None]
"""Where a thread sends due credits in `priority` mode (the control channel of the server)."""


class IoThread:
    def __init__(
        self,
        index: int,
        threads: Sequence[IoThread],
        grant: GrantSink | None,
        keepalive_s: float = 100.0,
    ) -> None:
        self.index = index
        self.threads = threads
        """All the engine's threads, to forward work to the owner of a connection."""
        self.grant = grant
        self.stats = ThreadStats()
        self.owned: set[Connection] = set()
        self._inbox: deque[WorkItem] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_pending = False
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._touched: set[Connection] = set()
        self._running = True
        self._keepalive_s = keepalive_s
        """A connection with nothing sent for this long gets a PING (the server's idle timeout)."""
        self._next_keepalive = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"flexemr-io-{index}")

    @property
    def queue_depth(self) -> int:
        return len(self._inbox)

    def post(self, item: WorkItem) -> None:
        self._inbox.append(item)
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._wake_w.send(b"\0")
            except (BlockingIOError, OSError):
                pass

    def submit(self, conn: Connection, request: LookupRequest, future: Future[np.ndarray]) -> None:
        self.post(Lookup(conn, request, future))

    # -- the loop -------------------------------------------------------------------------------------

    def _run(self) -> None:
        for conn in self.owned:
            conn.owner_ident = threading.get_ident()
        try:
            while self._running:
                for key, mask in self._selector.select(timeout=1.0):
                    if key.data is None:
                        self._drain_wake()
                    else:
                        self._on_ready(key.data, mask)
                self.stats.loops += 1
                self._wake_pending = False
                while self._inbox and self._running:
                    self._handle(self._inbox.popleft())
                self._keepalive()
                self._settle()
        except Exception:
            log.exception("I/O thread %d crashed", self.index)
            raise
        finally:
            self.dispose()

    def dispose(self) -> None:
        """Release the selector and the wake-up pair (the loop ended, or never started)."""
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _drain_wake(self) -> None:
        # One read takes every byte posted so far (a byte per wake-up, a few at most); a byte
        # posted after it wakes the selector again.
        try:
            self._wake_r.recv(4096)
        except BlockingIOError:
            pass

    def _handle(self, item: WorkItem) -> None:
        if isinstance(item, Stop):
            self._running = False
            return
        conn = item.conn
        if conn not in self.owned:
            if conn.owner != self.index:  # it changed hands: its new owner carries the item out
                self.stats.forwarded += 1
                self.threads[conn.owner].post(item)
                return
            self._adopt(conn)
        match item:
            case Lookup(_, request, future):
                self._send_lookup(conn, request, future)
            case Release(_, target):
                self._release(conn, target)
            case Attach(_, sock):
                conn.attach(sock)
                self._register(conn)
            case Fail(_, reason):
                if conn.alive:
                    self._fail(conn, reason)
            case Adopt():
                pass  # adopted above
            case _:
                raise AssertionError(f"I/O thread {self.index} cannot carry out {item!r}")

    def _send_lookup(self, conn: Connection, request: LookupRequest, future: Future[np.ndarray]) -> None:
        if not conn.alive:
            future.set_exception(ServerUnavailable(conn.server, str(conn.endpoint), conn.last_error))
            return
        conn.queue_lookup(request, future)
        self.stats.subrequests += 1
        self._touched.add(conn)

    def _keepalive(self) -> None:
        now = time.monotonic()
        if now < self._next_keepalive:
            return
        self._next_keepalive = now + self._keepalive_s / 4
        for conn in self._served():
            self._ping_if_idle(conn, now)

    def _served(self) -> Iterable[Connection]:
        """The connections this thread serves: those it owns."""
        return self.owned

    def _ping_if_idle(self, conn: Connection, now: float) -> None:
        if conn.alive and now - conn.last_sent > self._keepalive_s:
            conn.queue_ping()
            self._touched.add(conn)

    def fail_all(self, reason: str) -> None:
        """This thread died: fail its connections and the work queued for it (from another thread,
        as the owner is gone)."""
        for conn in list(self.owned):
            conn.owner_ident = None
            conn.fail(reason)
        while self._inbox:
            item = self._inbox.popleft()
            if isinstance(item, Lookup) and not item.future.done():
                conn = item.conn
                item.future.set_exception(ServerUnavailable(conn.server, str(conn.endpoint), reason))

    def _on_ready(self, conn: Connection, mask: int) -> None:
        if not conn.alive:
            return
        try:
            if mask & selectors.EVENT_READ:
                before = conn.stats.bytes_received
                self.stats.responses += conn.read()
                self.stats.bytes_received += conn.stats.bytes_received - before
            if mask & selectors.EVENT_WRITE:
                self.stats.bytes_sent += conn.flush()
        except ProtocolError as exc:
            log.error("embedding server %d: malformed frame: %s", conn.server, exc)
            self._fail(conn, f"malformed frame from server: {exc}")
            return
        except OSError as exc:
            self._fail(conn, f"connection lost: {exc}")
            return
        self._touched.add(conn)

    def _settle(self) -> None:
        """After a round of events: send due credits, flush, and watch for writability as needed."""
        touched, self._touched = self._touched, set()
        for conn in touched:
            self._settle_connection(conn)

    def _settle_connection(self, conn: Connection) -> None:
        if not conn.alive:
            return
        if conn.credits is not None:
            waits = conn.credits.waits
            due = conn.credits.due(len(conn.pending))
            self.stats.credit_waits += conn.credits.waits - waits
            if due and conn.piggyback:
                conn.queue_credit(due)
            elif due and self.grant is not None:
                self.grant(conn, due)
        try:
            if conn.wants_write:
                self.stats.bytes_sent += conn.flush()
        except OSError as exc:
            self._fail(conn, f"send failed: {exc}")
            return
        self._watch(conn, conn.wants_write)

    # -- ownership --------------------------------------------------------------------------------------

    def _register(self, conn: Connection) -> None:
        if conn.alive:
            assert conn.sock is not None
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.wants_write else 0)
            try:
                self._selector.register(conn.sock, events, conn)
            except KeyError:
                self._selector.modify(conn.sock, events, conn)

    def _watch(self, conn: Connection, write: bool) -> None:
        assert conn.sock is not None
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        try:
            if self._selector.get_key(conn.sock).events != events:
                self._selector.modify(conn.sock, events, conn)
        except KeyError:
            self._selector.register(conn.sock, events, conn)

    def _unregister(self, conn: Connection) -> None:
        for key in list(self._selector.get_map().values()):
            if key.data is conn:
                try:
                    self._selector.unregister(key.fileobj)
                except (KeyError, ValueError):
                    pass

    def _adopt(self, conn: Connection) -> None:
        conn.owner_ident = threading.get_ident()
        self.owned.add(conn)
        self._register(conn)
        self._touched.add(conn)
        if conn.stats.migrations:
            self.stats.migrations_in += 1

    def _release(self, conn: Connection, target: int) -> None:
        """Hand conn to thread `target`: stop watching it, then publish the new owner. Its partial
        frames (in or out) and pending futures live in the connection object and go with it."""
        if target == self.index:
            return
        self._unregister(conn)
        self.owned.discard(conn)
        self._touched.discard(conn)
        conn.owner_ident = None
        conn.stats.migrations += 1
        self.stats.migrations_out += 1
        conn.owner = target  # last: from here on, items for conn go to the target
        self.threads[target].post(Adopt(conn))

    def _fail(self, conn: Connection, reason: str) -> None:
        self._unregister(conn)
        conn.fail(reason)
        log.warning(
            "embedding server %d at %s: connection %d down: %s", conn.server, conn.endpoint, conn.cid, reason
        )

    def stop(self) -> None:
        self.post(Stop())
        self.thread.join(10)
