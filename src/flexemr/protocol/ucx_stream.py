"""Node links over UCX (the `ucx` extra): a UCX stream endpoint that behaves like a TCP socket.

UCX picks the best transport at run time (RDMA verbs, shared memory, TCP; `UCX_TLS` restricts
it), so the same frames, handshake and engine run over InfiniBand/RoCE where the hardware and a
UCX built with verbs exist, and over TCP or shared memory elsewhere. The link is UCX's *stream*
API: an ordered byte stream per endpoint, like TCP, so the frame format, the incremental parser
and the handshake are the TCP ones, unchanged:

    UcxSocket.recv_into(view)   posts ucp_stream_recv (WAITALL) straight into `view`, the array
                                the parser allocated after checking the header: zero-copy receive
    UcxSocket.sendmsg(views)    posts one ucp_stream_send per view, from the arrays' own memory
    UcxSocket.fileno()          the worker's event fd, for a selectors loop (armed before sleeping)

A `WorkerDriver` owns one UCX worker: every call into it holds its lock, and threads that block
(a server's connection threads, a ranker's control channel) take turns progressing it: one sleeps
on its event fd, the others on a condition, woken after each round. A ranker's data connection has
a worker of its own (UCX cannot move an endpoint to another worker, and the I/O engine migrates
connections between threads), progressed only by the I/O thread that owns the connection. An
embedding server has one worker for all its connections: the listener's.

Peer failure: endpoints are created with UCX's peer error handling (a dead peer fails what is in
flight, like a TCP reset), except when `UCX_TLS` names a shared-memory transport: UCX reaches a
peer over shared memory only without it. There a dead peer is noticed by the heartbeat and the
idle timeout, not by UCX, and closing an endpoint waits (at most `CLOSE_WAIT_S`) for the peer's
part of the close, without which UCX would keep the worker and its descriptors.

No import of ucxx happens before a UCX link is asked for.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from flexemr.config import Endpoint
from flexemr.extras import needs_extra
from flexemr.protocol.frames import HEADER

log = logging.getLogger(__name__)

SHARED_MEMORY_TRANSPORTS = ("sm", "shm", "posix", "sysv", "cma", "xpmem", "knem")
CLOSE_WAIT_S = 1.0
"""How long closing a ranker's endpoint waits for UCX to complete the close (at once when forced;
over shared memory, once the peer has taken part): until then UCX holds the worker's descriptors."""
POLL_S = 0.1
"""The longest a waiting thread sleeps before it checks its own deadline and the socket's state."""


def _ucx() -> Any:
    """The ucxx core API, imported on first use."""
    os.environ.setdefault("UCX_RNDV_FRAG_MEM_TYPE", "host")  # ucxx's import would make it cuda
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")  # ucxx sets one this UCX does not read
    with needs_extra("ucx"):
        import ucxx._lib.libucxx as ucx_api
    return ucx_api


def _array(view: memoryview) -> Any:
    from ucxx._lib.arr import Array

    return Array(view)


def peer_error_handling() -> bool:
    """UCX's peer error handling, unless `UCX_TLS` asks for shared memory (which works without only)."""
    names = os.environ.get("UCX_TLS", "").replace("^", "").split(",")
    return not any(n.strip() in SHARED_MEMORY_TRANSPORTS for n in names)


_context_lock = threading.Lock()
_contexts: dict[str, Any] = {}


def _shared_context() -> Any:
    """One UCX context per process and `UCX_TLS` (UCX reads its environment when it makes one;
    a context opens the transports, so workers are cheap beside it)."""
    tls = os.environ.get("UCX_TLS", "")
    with _context_lock:
        if tls not in _contexts:
            ucx = _ucx()
            _contexts[tls] = ucx.UCXContext(feature_flags=(ucx.Feature.STREAM, ucx.Feature.WAKEUP))
        return _contexts[tls]


class WorkerDriver:
    """One UCX worker and the threads that wait on it (see the module's docstring)."""

    def __init__(self) -> None:
        self.worker = _ucx().UCXWorker(_shared_context())
        self.worker.init_blocking_progress_mode()
        self.lock = threading.RLock()
        self._turn = threading.Condition()
        self._sleeping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._events = select.epoll()
        """The worker's event fd and the wake-up pipe: what a thread (or a selectors loop) sleeps on."""
        self._events.register(int(self.worker.epoll_file_descriptor), select.EPOLLIN)
        self._events.register(self._wake_r, select.EPOLLIN)
        self.closed = False

    def fileno(self) -> int:
        return self._events.fileno()

    def progress(self) -> None:
        with self.lock:
            self.worker.progress()

    def arm(self) -> bool:
        """Arm the event fd; False when events are pending (progress first, then arm again)."""
        with self.lock:
            return bool(self.worker.arm())

    def poke(self) -> None:
        """Wake the thread asleep on the event fd (new work was posted, or a socket shut down)."""
        if self._sleeping:
            self.wake()

    def wake(self) -> None:
        """Make the event fd readable now (until `drain`)."""
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def drain(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass

    def wait(self, done: Callable[[], bool], deadline: float | None) -> bool:
        """Progress the worker until `done()` or `deadline` (time.monotonic); returns `done()`.
        One waiting thread at a time progresses the worker and sleeps on its event fd; the others
        sleep on a condition and look again after each of its progress calls (they never progress
        it themselves: what they took off the worker could be what the sleeper waits for)."""
        while not done():
            left = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
            if left <= 0:
                return False
            with self._turn:
                if self._sleeping:
                    self._turn.wait(left)
                    continue
                self._sleeping = True
            try:
                with self.lock:
                    self.worker.progress()
                    armed = not done() and bool(self.worker.arm())
                with self._turn:  # what this progress completed may be another thread's: it goes on
                    self._turn.notify_all()
                if armed:
                    poll = select.poll()  # not select(): a process with many workers has fds over 1024
                    poll.register(self.fileno(), select.POLLIN)
                    poll.poll(left * 1000)
                    self.drain()
                    self.progress()
            finally:
                with self._turn:
                    self._sleeping = False
                    self._turn.notify_all()
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.worker = None  # its file descriptors go with it
            self._events.close()
            os.close(self._wake_r)
            os.close(self._wake_w)


@dataclass
class _Posted:
    request: Any
    keep: Any
    """What the request reads or writes: it must live until the request completes."""


class UcxSocket:
    """A UCX stream endpoint with the socket methods the frames, the handshake, the engine and the
    server use. Blocking (with `settimeout`) or not (`setblocking(False)`: BlockingIOError)."""

    def __init__(self, driver: WorkerDriver, endpoint: Any, peer: str, owns_driver: bool) -> None:
        self._driver = driver
        self._endpoint = endpoint
        self.peer = peer
        self._owns_driver = owns_driver
        self._error_handling = peer_error_handling()
        self._timeout: float | None = None
        self._blocking = True
        self._recv: _Posted | None = None
        self._peek: _Posted | None = None
        self._peek_buffer = bytearray(HEADER.size)
        self._peeked = memoryview(b"")
        self._sends: list[_Posted] = []
        self._shut = False

    def fileno(self) -> int:
        return self._driver.fileno()

    # -- the socket interface --------------------------------------------------------------------------

    def settimeout(self, timeout: float | None) -> None:
        self._timeout, self._blocking = timeout, True

    def setblocking(self, blocking: bool) -> None:
        self._timeout, self._blocking = None, blocking

    def setsockopt(self, *args: Any) -> None:
        """Socket options (TCP_NODELAY, priority marks) do not apply to a UCX endpoint."""

    def recv_into(self, view: memoryview) -> int:
        """Fill all of `view` (UCX streams receive whole buffers; only what `pending` peeked may
        come in parts); returns the bytes received."""
        if not view.nbytes:
            return 0
        self._check_open()
        if self._peek is not None:
            peek = self._peek.request
            self._wait(lambda: bool(peek.completed) or self._shut, "receive")
            self._completed(peek)
            self._peek, self._peeked = None, memoryview(self._peek_buffer)
        if self._peeked.nbytes:
            n = min(view.nbytes, self._peeked.nbytes)
            view[:n] = self._peeked[:n]
            self._peeked = self._peeked[n:]
            return n
        if self._recv is None:
            with self._driver.lock:
                self._recv = _Posted(self._endpoint.stream_recv(_array(view)), view)
            self._driver.poke()  # a thread asleep on the worker progresses what was just posted
        elif self._recv.keep.nbytes != view.nbytes:
            raise AssertionError("a UCX stream receive resumed with another buffer")
        request = self._recv.request
        self._wait(lambda: bool(request.completed) or self._shut, "receive")
        self._completed(request)
        self._recv = None
        return view.nbytes

    def pending(self) -> int:
        """Bytes that can be read now without waiting (like `ssl.SSLSocket.pending`): a frame
        header's worth, once one has arrived; 0 before."""
        self._check_open()
        if self._peeked.nbytes:
            return self._peeked.nbytes
        if self._peek is None:
            with self._driver.lock:
                self._peek = _Posted(self._endpoint.stream_recv(_array(memoryview(self._peek_buffer))), None)
        self._driver.progress()
        return len(self._peek_buffer) if self._peek.request.completed else 0

    def sendmsg(self, views: Sequence[memoryview]) -> int:
        """Post every view (UCX queues what the link cannot take yet); returns the bytes posted.
        Blocking: waits until they are sent. Raises OSError when an earlier send failed."""
        self._check_open()
        self._reap_sends()
        posted = []
        with self._driver.lock:
            for view in views:
                if view.nbytes:
                    posted.append(_Posted(self._endpoint.stream_send(_array(view)), view))
        self._sends.extend(posted)
        self._driver.poke()
        if self._blocking:
            self._wait(lambda: all(p.request.completed for p in posted) or self._shut, "send")
            self._check_open()
            self._reap_sends()
        else:
            # An I/O thread: push the sends now, then make the event fd readable unless a receive
            # is in flight and the worker is armed: its loop comes back to read before sleeping.
            # Without a receive posted (a fresh connection's first request) the fd cannot tell:
            # an answer that this progress took in waits in UCX's stream queue, and arm() succeeds
            # as no transport event is left (the answer would never be read).
            self._driver.progress()
            receiving = self._recv is not None and not self._recv.request.completed
            if not receiving or not self._driver.arm():
                self._driver.wake()
        return sum(v.nbytes for v in views)

    def sendall(self, data: bytes) -> None:
        self.sendmsg([memoryview(data)])

    def shutdown(self, how: int = 0) -> None:
        """Wake every thread blocked on this socket; their calls raise ConnectionError."""
        self._shut = True
        self._driver.poke()

    def close(self) -> None:
        if self._endpoint is None:
            return
        self.shutdown()
        endpoint, self._endpoint = self._endpoint, None
        closing = None
        with self._driver.lock:
            if endpoint.alive:  # closing one that failed (the peer closed it) crashes ucxx
                # Forced with peer error handling (nothing asked of the peer), flushed without
                # (shared memory: the peer takes part; a server's waiting threads progress it).
                closing = endpoint.close()
        if self._owns_driver:
            # UCX holds the endpoint, and with it the worker and its descriptors, until the close
            # completes: progress it here. Not forever: a stopped peer would hold this thread too.
            # (ucxx's close_blocking, the other way, leaves the worker behind when a receive is
            # posted, as an I/O thread's always is.)
            done = closing is None or self._driver.wait(
                lambda: bool(closing.completed), time.monotonic() + CLOSE_WAIT_S
            )
            if not done:
                log.warning(
                    "UCX close to %s not confirmed in %s s: its worker stays open", self.peer, CLOSE_WAIT_S
                )
            self._recv = self._peek = None  # the requests hold the endpoint, which holds the worker
            self._sends.clear()
            self._driver.close()

    # -- waiting ---------------------------------------------------------------------------------------

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        if not self._blocking:
            # An I/O thread's loop: progress, and arm the event fd before it may sleep on it.
            self._driver.drain()
            while True:
                self._driver.progress()
                if done():
                    return
                if self._driver.arm():
                    raise BlockingIOError(f"UCX {what} in progress")
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        if not self._driver.wait(done, deadline):
            raise TimeoutError(f"UCX {what} timed out after {self._timeout} s")

    def _check_open(self) -> None:
        if self._shut or self._endpoint is None:
            raise ConnectionAbortedError("UCX endpoint shut down")

    def _completed(self, request: Any) -> None:
        """Raise unless `request` completed well (an unfinished one keeps its buffer for UCX)."""
        if not request.completed:
            raise ConnectionAbortedError("UCX endpoint shut down")
        try:
            request.check_error()
        except Exception as exc:  # ucxx's errors: the peer is gone (reset, unreachable, ...)
            raise ConnectionResetError(f"UCX: {type(exc).__name__}: {exc}") from None

    def _reap_sends(self) -> None:
        done = [p for p in self._sends if p.request.completed]
        if done:
            self._sends = [p for p in self._sends if not p.request.completed]
            for p in done:
                self._completed(p.request)


def connect(endpoint: Endpoint, timeout_s: float) -> UcxSocket:
    """A UCX stream endpoint to `endpoint`, on a worker of its own (blocking, `timeout_s`)."""
    driver = WorkerDriver()
    try:
        with driver.lock:
            ep = _ucx().UCXEndpoint.create(driver.worker, endpoint.host, endpoint.port, peer_error_handling())
    except Exception as exc:
        driver.close()
        raise ConnectionRefusedError(f"UCX connect to {endpoint}: {exc}") from None
    sock = UcxSocket(driver, ep, str(endpoint), owns_driver=True)
    sock.settimeout(timeout_s)
    return sock


class UcxListener:
    """Accepts UCX endpoints on `port` (0: any free port). ucxx's listener binds every interface:
    it has no bind address, so a UCX server must have the secret (`config.security.check_bind`)."""

    def __init__(self, port: int) -> None:
        self._driver = WorkerDriver()
        self._accepted: list[UcxSocket] = []
        self._closed = False
        ucx = _ucx()
        with self._driver.lock:
            self._listener = ucx.UCXListener.create(self._driver.worker, port, self._on_request)
        self.port = int(self._listener.port)

    def _on_request(self, conn_request: Any) -> None:  # runs inside progress, with the lock held
        ep = self._listener.create_endpoint_from_conn_request(conn_request, peer_error_handling())
        self._accepted.append(UcxSocket(self._driver, ep, "ucx peer", owns_driver=False))

    def accept(self) -> tuple[UcxSocket, tuple[str, int]]:
        """The next endpoint; OSError once closed."""
        while not self._driver.wait(lambda: bool(self._accepted) or self._closed, None):
            pass
        if self._closed:
            raise OSError("UCX listener closed")
        with self._driver.lock:
            return self._accepted.pop(0), ("ucx", 0)

    def getsockname(self) -> tuple[str, int]:
        return ("0.0.0.0", self.port)

    def shutdown(self, how: int = 0) -> None:
        self._closed = True
        self._driver.poke()

    def close(self) -> None:
        self.shutdown()
        with self._driver.lock:
            self._listener = None  # ucxx's listener stops listening when freed
