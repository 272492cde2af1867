"""The UCX stream socket (`protocol.ucx_stream`) itself, both ends in this process, over UCX's TCP
and over shared memory: an I/O thread's selector is woken for every answer, and closed connections
give their file descriptors back."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable, Iterator

import pytest

pytest.importorskip("ucxx", reason="the ucx extra is not installed (pip install 'flexemr[ucx]')")

from flexemr.config import Endpoint
from flexemr.protocol import ucx_stream


@pytest.fixture
def listener(link: str) -> Iterator[ucx_stream.UcxListener]:
    listener = ucx_stream.UcxListener(0)
    try:
        yield listener
    finally:
        listener.close()


def serve(
    listener: ucx_stream.UcxListener, connections: int, talk: Callable[[ucx_stream.UcxSocket], None]
) -> tuple[threading.Thread, list[ucx_stream.UcxSocket]]:
    """Accept `connections` connections one after the other in a thread and `talk` on each
    (blocking, 10 s timeout); the sockets stay open (a close may drop what was just sent)."""
    accepted: list[ucx_stream.UcxSocket] = []

    def run() -> None:
        for _ in range(connections):
            try:
                sock, _ = listener.accept()
            except OSError:  # closed: the test failed
                return
            accepted.append(sock)
            sock.settimeout(10)
            talk(sock)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, accepted


def receive(sock: ucx_stream.UcxSocket, n: int) -> bytes:
    data = bytearray(n)
    assert sock.recv_into(memoryview(data)) == n
    return bytes(data)


def receive_when_readable(sock: ucx_stream.UcxSocket, n: int) -> bytes:
    """As an I/O thread reads a non-blocking socket: sleep until its fd is readable, then read."""
    data = memoryview(bytearray(n))
    poll = select.poll()
    poll.register(sock.fileno(), select.POLLIN)
    deadline = time.monotonic() + 10
    while True:
        left = deadline - time.monotonic()
        assert left > 0 and poll.poll(left * 1000), "the answer arrived but the selector never woke"
        try:
            sock.recv_into(data)
        except BlockingIOError:
            continue
        return bytes(data)


def test_an_answer_taken_in_before_any_receive_still_wakes_the_selector(
    listener: ucx_stream.UcxListener,
) -> None:
    """A fresh connection's first answers: the I/O thread has posted no receive yet, and a send's
    progress takes an answer in (into UCX's stream queue, where the worker's event fd cannot see
    it). The socket must still look readable, or the I/O thread sleeps forever beside its answer
    (the hang seen as "no answer within 10 s" on a loaded machine, where a server answers before
    the ranker's thread runs again). Several connections: how the first events fall varies."""
    connections = 10
    answered = threading.Semaphore(0)

    def server(sock: ucx_stream.UcxSocket) -> None:
        assert receive(sock, 5) == b"hello"
        sock.sendall(b"welcome")
        assert receive(sock, 7) == b"request"
        sock.sendall(b"answer")  # returns once UCX has taken it
        answered.release()
        assert receive(sock, 4) == b"more"

    thread, accepted = serve(listener, connections, server)
    clients = []
    try:
        for _ in range(connections):
            client = ucx_stream.connect(Endpoint("127.0.0.1", listener.port), 10)
            clients.append(client)
            client.sendall(b"hello")  # the handshake's part: blocking
            assert receive(client, 7) == b"welcome"
            client.setblocking(False)  # from here on as the ranker's I/O thread drives it
            client.sendmsg([memoryview(b"request")])
            assert answered.acquire(timeout=10)
            client.sendmsg([memoryview(b"more")])  # its progress takes the answer in
            assert receive_when_readable(client, 6) == b"answer"
    finally:
        for sock in clients:
            sock.close()
        thread.join(30)
        for sock in accepted:
            sock.close()


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_closed_connections_give_their_descriptors_back(listener: ucx_stream.UcxListener) -> None:
    """Each connection of a ranker has a UCX worker of its own (about 10 descriptors: its event
    fds, epoll sets, shared-memory segments); closing the connection must free it, with the
    receive that an I/O thread always has posted. Leaked before: over shared memory a close that
    did not wait for the peer's part, over TCP ucxx's close_blocking with a receive posted (a
    ranker process ran out of descriptors after some 150 rankers)."""
    connections, accepted = 40, []

    def server() -> None:
        while True:
            try:
                sock, _ = listener.accept()  # progresses the closes of the connections before
            except OSError:  # the listener closed: the test is over
                return
            sock.settimeout(10)
            assert receive(sock, 5) == b"hello"
            sock.sendall(b"welcome")
            accepted.append(sock)

    thread = threading.Thread(target=server, daemon=True)
    thread.start()
    counts = []
    try:
        for _ in range(connections):
            client = ucx_stream.connect(Endpoint("127.0.0.1", listener.port), 10)
            try:
                client.sendall(b"hello")
                assert receive(client, 7) == b"welcome"
                client.setblocking(False)  # as an I/O thread holds it: a receive always posted
                with pytest.raises(BlockingIOError):
                    client.recv_into(memoryview(bytearray(8)))
            finally:
                client.close()
            counts.append(open_descriptors())
    finally:
        listener.close()
        thread.join(10)
        for sock in accepted:
            sock.close()
    # After a few connections (UCX opens its shared resources once): no growth with the count
    # (a leak of one worker per connection would be over 300 descriptors here).
    assert counts[-1] - counts[4] < 20, f"descriptors after each closed connection: {counts}"
