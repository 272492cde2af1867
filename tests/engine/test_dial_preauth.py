"""What the ranker spends on a peer at a server's address before it has proven the secret: its
control and data links give the whole handshake one deadline and read nothing bigger than a
handshake message, so a fake server can neither hold a dialing thread nor make it allocate."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from flexemr.config import Endpoint, FrameLimits
from flexemr.config.security import Identity
from flexemr.engine.dial import Dialer
from flexemr.protocol.frames import DESCRIPTOR, HEADER, MAGIC, VERSION, MessageType, encode, recv_frame
from flexemr.protocol.handshake import Welcome, new_nonce

IDENTITY = Identity(server=0, rows=100, dim=8, fingerprint="ab" * 32)


@contextmanager
def fake_server(behave: Callable[[socket.socket], None]) -> Iterator[Endpoint]:
    """A listener at a server's address whose one connection `behave` handles after reading the
    ranker's HELLO."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            try:
                recv_frame(conn, FrameLimits())
                behave(conn)
            except OSError:
                pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield Endpoint("127.0.0.1", listener.getsockname()[1])
    finally:
        listener.close()
        thread.join(60)


def dialer() -> Dialer:
    return Dialer("session", b"the secret", FrameLimits())


@pytest.mark.parametrize("role", ["control", "data"])
def test_a_server_that_dribbles_its_welcome_is_given_up_at_the_deadline(role: str) -> None:
    welcome = Welcome(IDENTITY, new_nonce(), new_nonce())
    raw = json.dumps(dataclasses.asdict(welcome)).encode()
    reply = b"".join(encode(MessageType.HELLO, 0, [np.frombuffer(raw, dtype=np.uint8)]))
    sent = [0]

    def dribble(conn: socket.socket) -> None:
        # a byte every 0.2 s: within any per-read timeout, but a minute for the whole message
        while sent[0] < len(reply):
            sent[0] += conn.send(reply[sent[0] : sent[0] + 1])
            time.sleep(0.2)

    with fake_server(dribble) as endpoint, pytest.raises(TimeoutError):
        dialer().open(endpoint, IDENTITY, role, timeout_s=1.0)  # type: ignore[arg-type]
    assert sent[0] < len(reply)


@pytest.mark.parametrize(
    ("kind", "declared", "message"),
    [
        (MessageType.HELLO, 512 * 2**20, "exceeds the limit of 4096"),
        (MessageType.RESULT, 64, "expected HELLO or ERROR"),
    ],
)
def test_a_server_whose_first_header_is_not_a_small_welcome_is_refused_from_the_header(
    kind: MessageType, declared: int, message: str
) -> None:
    def oversized(conn: socket.socket) -> None:
        conn.sendall(
            HEADER.pack(MAGIC, VERSION, kind, 0, 0, 1, declared) + DESCRIPTOR.pack(4, 1, declared, 0)
        )
        conn.sendall(bytes(1 << 20))  # the ranker must not be reading this

    with fake_server(oversized) as endpoint, pytest.raises(Exception, match=message):
        dialer().open(endpoint, IDENTITY, "control", timeout_s=30.0)
