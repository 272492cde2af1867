"""What an embedding server spends before a peer proves the secret, over real server processes on
127.0.0.1: a handshake has a deadline however often the peer sends a byte, unauthenticated
connections never lock out a ranker that holds the secret, handshake headers that declare big
bodies commit no memory, and broken handshakes get one ERROR and a close, never a traceback."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import resource
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexemr.config import FrameLimits, NodeLimits
from flexemr.embedding_server.store import ShardStore
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import load_weights
from flexemr.model.weights import build_monolithic
from flexemr.protocol.frames import (
    DESCRIPTOR,
    HEADER,
    MAGIC,
    VERSION,
    ConnectionClosed,
    MessageType,
    encode,
    error_text,
    recv_frame,
    send_frame,
)
from flexemr.protocol.handshake import Hello, new_nonce
from flexemr.transport.base import LookupRequest
from tests.core.helpers import assert_scores_like_the_monolith
from tests.engine.helpers import (
    ServerProcess,
    dial,
    embedding_server_process,
    lookup_frame,
    reference,
    tiny_spec,
)
from tests.engine.test_node_security import wait_for

SECRET = "pre-auth-test-secret"
LOG_INTERVAL_S = 10.0
"""The servers log each kind of refusal at most this often (`flexemr.logs.RateLimitedWarnings`)."""
DECLARED = 512 * 2**20
"""What the oversized headers declare: the largest body a frame may have after the handshake."""


@contextmanager
def secret_server(tmp_path: Path, handshake_timeout_s: float) -> Iterator[ServerProcess]:
    """One embedding-server process holding the secret; asserts afterwards that it is alive and
    never printed a traceback."""
    spec = dataclasses.replace(tiny_spec(1), limits=NodeLimits(handshake_timeout_s=handshake_timeout_s))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FLEXEMR_SECRET", SECRET)
        with embedding_server_process(spec, tmp_path, max_fds=4096) as server:
            yield server
    assert not any("Traceback" in line for line in server.lines), "".join(server.lines[-40:])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Shared by the tests that only send it broken handshakes."""
    with secret_server(tmp_path_factory.mktemp("preauth"), handshake_timeout_s=30.0) as server:
        yield server


def address(server: ServerProcess) -> tuple[str, int]:
    endpoint = server.spec.embedding_servers[0]
    return endpoint.host, endpoint.port


def assert_serves(server: ServerProcess, seed: int = 0) -> None:
    """A holder of the secret gets exact rows."""
    store = ShardStore(server.spec.sharding, 0, load_weights(server.spec.model), progress=False)
    request = LookupRequest(np.array([1, 2, 7, seed], np.int64), np.array([0, 1], np.int64))
    with dial(server.spec.embedding_servers[0], SECRET.encode()) as sock:
        send_frame(sock, lookup_frame(1, request))
        frame = recv_frame(sock, FrameLimits())
    assert frame.type == MessageType.RESULT
    np.testing.assert_allclose(frame.buffers[0], reference(store, request), rtol=1e-6)


def message(kind: MessageType, body: bytes) -> bytes:
    return b"".join(encode(kind, 0, [np.frombuffer(body, dtype=np.uint8)]))


def hello_bytes(session: str = "peer") -> bytes:
    return message(
        MessageType.HELLO, json.dumps(dataclasses.asdict(Hello("data", session, new_nonce()))).encode()
    )


def declaring(kind: MessageType, size: int) -> bytes:
    """A header and descriptor of one byte buffer of `size` bytes (the body is up to the caller)."""
    return HEADER.pack(MAGIC, VERSION, kind, 0, 0, 1, size) + DESCRIPTOR.pack(4, 1, size, 0)


def closed_by_peer(sock: socket.socket) -> bool:
    """The server has closed `sock` (whatever it sent before is read and dropped)."""
    try:
        while select.select([sock], [], [], 0)[0]:
            if not sock.recv(1 << 16):
                return True
    except OSError:
        return True
    return False


def refusal_lines(server: ServerProcess, reason: str) -> int:
    return sum(f": {reason} (" in line for line in server.lines)


def test_a_slow_loris_handshake_is_closed_at_its_deadline(tmp_path: Path) -> None:
    with secret_server(tmp_path, handshake_timeout_s=1.0) as server:
        hello = hello_bytes()
        socks = [socket.create_connection(address(server), timeout=30) for _ in range(4)]
        sent = [0] * len(socks)
        with ExitStack() as stack:
            for sock in socks:
                stack.enter_context(sock)
            # A byte every 0.25 s: each read gets one well within the 1 s timeout, so only a
            # deadline for the whole handshake (about 60 s of bytes) closes these connections.
            while not all(closed_by_peer(s) for s in socks) and min(sent) < len(hello):
                for i, sock in enumerate(socks):
                    if sent[i] < len(hello) and not closed_by_peer(sock):
                        try:
                            sent[i] += sock.send(hello[sent[i] : sent[i] + 1])
                        except OSError:
                            pass
                time.sleep(0.25)
            assert all(closed_by_peer(s) for s in socks)
        assert max(sent) < len(hello), f"the server waited for all {len(hello)} bytes: {sent}"
        assert wait_for(lambda: refusal_lines(server, "handshake deadline") > 0)
        assert_serves(server)


def raise_open_files(at_least: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < at_least:
        if hard != resource.RLIM_INFINITY and hard < at_least:
            pytest.skip(f"needs {at_least} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (at_least, hard))


class Dribbler:
    """Sends the next byte of a HELLO on each of its connections every `interval_s`, in a thread."""

    def __init__(self, socks: list[socket.socket], interval_s: float = 0.5) -> None:
        self._socks = socks
        self._interval_s = interval_s
        self._hello = hello_bytes("dribbler")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for position in range(len(self._hello)):
            if self._stop.wait(self._interval_s):
                return
            for sock in self._socks:
                try:
                    sock.send(self._hello[position : position + 1])
                except OSError:
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def test_a_ranker_gets_in_and_scores_exactly_past_1000_unauthenticated_connections(tmp_path: Path) -> None:
    raise_open_files(4096)
    # A deadline longer than the test: only the handshake slots can let the ranker in.
    with secret_server(tmp_path, handshake_timeout_s=600.0) as server, ExitStack() as flood:
        dribbling = []
        for i in range(1000):  # idle, dribbling a HELLO, or an oversized HELLO header
            sock = flood.enter_context(socket.create_connection(address(server), timeout=30))
            if i % 3 == 1:
                dribbling.append(sock)
            elif i % 3 == 2:
                sock.sendall(declaring(MessageType.HELLO, DECLARED))
        dribbler = Dribbler(dribbling)
        flood.callback(dribbler.stop)

        ranker = build_ranker(server.spec, connect_timeout_s=60)  # FLEXEMR_SECRET: set by secret_server
        try:
            model = build_monolithic(load_weights(server.spec.model))
            assert_scores_like_the_monolith(ranker.score, model)
        finally:
            ranker.close()
        assert refusal_lines(server, "handshake slots full") > 0  # the flood took every slot it could
        assert refusal_lines(server, "malformed handshake") > 0  # the oversized headers were refused


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    kib = next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]
    return int(kib) * 1024


class RssPeak:
    """The highest resident set size of a process, sampled in a thread until `stop`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(30)
        self.peak = max(self.peak, rss_bytes(self.pid))
        return self.peak


def oversized(server: ServerProcess, kind: MessageType) -> socket.socket:
    """A connection whose first frame before the proof (a HELLO, an AUTH after a good HELLO, or a
    LOOKUP) declares DECLARED bytes and brings 256 KiB of them."""
    sock = socket.create_connection(address(server), timeout=30)
    try:
        if kind == MessageType.AUTH:
            sock.sendall(hello_bytes())
            assert recv_frame(sock, FrameLimits()).type == MessageType.HELLO
        sock.sendall(declaring(kind, DECLARED))
        sock.sendall(bytes(256 * 1024))
    except OSError:
        pass  # refused from the header: the server closed before the body
    return sock


def test_oversized_headers_before_the_proof_commit_no_memory(tmp_path: Path) -> None:
    with secret_server(tmp_path, handshake_timeout_s=600.0) as server, ExitStack() as held:
        assert_serves(server)  # the lookup path is warm: what grows now is the flood's
        before = rss_bytes(server.pid)
        sampler = RssPeak(server.pid)
        kinds = [MessageType.HELLO, MessageType.AUTH, MessageType.LOOKUP]
        for i in range(256):  # held open until the end
            held.enter_context(oversized(server, kinds[i % 3]))
        growth = sampler.stop() - before
        print(f"server RSS {before / 2**20:.1f} MiB, peak growth {growth / 2**20:.2f} MiB")
        assert growth < 16 * 2**20, f"the server's RSS grew by {growth / 2**20:.1f} MiB"
        assert refusal_lines(server, "malformed handshake") > 0
        assert_serves(server)


def refused_twice(server: ServerProcess, first: bytes | None, second: bytes) -> str:
    """Send `first` (None: a good HELLO, then read the server's answer) and `second`; the server
    must answer with exactly one ERROR, then close. Returns the ERROR's text."""
    with socket.create_connection(address(server), timeout=30) as sock:
        if first is None:
            sock.sendall(hello_bytes())
            assert recv_frame(sock, FrameLimits()).type == MessageType.HELLO
        else:
            sock.sendall(first)
        sock.sendall(second)
        answer = recv_frame(sock, FrameLimits())
        assert answer.type == MessageType.ERROR
        with pytest.raises((ConnectionClosed, ConnectionResetError)):
            recv_frame(sock, FrameLimits())
        return error_text(answer)


def test_the_two_reported_inputs_get_one_error_and_a_close_logged_at_a_rate(server: ServerProcess) -> None:
    start = time.monotonic()
    before = refusal_lines(server, "malformed handshake")
    deep = b"[" * 2040 + b"]" * 2040
    for _ in range(20):
        assert "AUTH" in refused_twice(server, None, message(MessageType.AUTH, b"{}"))
        assert "JSON object" in refused_twice(server, b"", message(MessageType.HELLO, deep))
    logged = refusal_lines(server, "malformed handshake") - before
    assert logged <= 1 + (time.monotonic() - start) / LOG_INTERVAL_S, "".join(server.lines[-10:])
    assert_serves(server)
    assert not any("Traceback" in line for line in server.lines), "".join(server.lines[-40:])


@pytest.mark.parametrize(
    "kind",
    [MessageType.LOOKUP, MessageType.UPDATE, MessageType.COMMIT, MessageType.CHANGES, MessageType.ROWS],
)
def test_no_request_is_read_before_the_proof(server: ServerProcess, kind: MessageType) -> None:
    request = declaring(kind, 16) + bytes(16)
    assert f"expected HELLO, got {kind.name}" in refused_twice(server, b"", request)
    assert f"expected AUTH, got {kind.name}" in refused_twice(server, None, request)


KEYS = ["role", "session", "nonce", "conn", "credits", "proof", "identity"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70) | st.just(new_nonce()),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=6)
    ),
    max_leaves=20,
)
bodies = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6).map(lambda v: json.dumps(v).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 3000).map(lambda n: b'{"role":' * n),
    st.binary(max_size=300),
)


@st.composite
def handshake_messages(draw: st.DrawFn) -> tuple[bool, bytes]:
    """(whether a good HELLO goes first, then one message: a JSON-ish or random body, framed right
    or with a header that lies about its type, size, buffers or dtype)."""
    after_hello = draw(st.booleans())
    body = draw(bodies)
    kind = draw(
        st.sampled_from(list(MessageType)) | st.just(MessageType.AUTH if after_hello else MessageType.HELLO)
    )
    if draw(st.booleans()):
        return after_hello, message(kind, body)
    count = draw(st.integers(0, 3))
    size = draw(st.sampled_from([len(body), len(body) + 1, 4096, 4097, DECLARED, 2**32 - 1]))
    code = draw(st.sampled_from([4, 1, 3, 255]))
    header = HEADER.pack(MAGIC, VERSION, kind, 0, 0, count, size)
    return after_hello, header + DESCRIPTOR.pack(code, 1, len(body), 0) * count + body


@settings(max_examples=150, deadline=None, database=None)
@given(case=handshake_messages())
def test_fuzzed_handshakes_get_nothing_but_hello_or_error(
    server: ServerProcess, case: tuple[bool, bytes]
) -> None:
    after_hello, raw = case
    with socket.create_connection(address(server), timeout=30) as sock:
        if after_hello:
            sock.sendall(hello_bytes())
            assert recv_frame(sock, FrameLimits()).type == MessageType.HELLO
        try:
            sock.sendall(raw)
            with contextlib.suppress(OSError):  # (unless the server has closed already)
                sock.shutdown(socket.SHUT_WR)  # nothing more: a short message ends here
            while True:
                frame = recv_frame(sock, FrameLimits())
                assert frame.type in (MessageType.HELLO, MessageType.ERROR), frame.type.name
        except (ConnectionClosed, ConnectionResetError, BrokenPipeError):
            pass


def test_after_the_fuzz_no_traceback_and_the_server_serves(server: ServerProcess) -> None:
    assert_serves(server, seed=5)
    assert not any("Traceback" in line for line in server.lines), "".join(server.lines[-40:])
    assert refusal_lines(server, "malformed handshake") > 0
