"""The handshake and the heartbeat's bookkeeping, without a server process."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading

import numpy as np
import pytest

from flexemr.config import FrameLimits
from flexemr.config.security import Identity
from flexemr.protocol.frames import MessageType, ProtocolError, encode, error_text, recv_frame, send_frame
from flexemr.protocol.handshake import (
    Hello,
    IdentityMismatch,
    NotAuthenticated,
    client_handshake,
    client_proof,
    decode_hello,
    decode_welcome,
    new_nonce,
    server_handshake,
)

IDENTITY = Identity(server=1, rows=100, dim=8, fingerprint="ab" * 32)
NONCE = b"5a" * 32
"""A well-formed nonce, fixed: test ids that carry it must be the same in every xdist worker."""


def handshake(
    client_key: bytes, server_key: bytes, expected: Identity | None = IDENTITY
) -> tuple[Identity | BaseException, Hello | BaseException]:
    """Run both sides over a socketpair; each side's result or exception."""
    a, b = socket.socketpair()
    results: dict[str, object] = {}

    def serve() -> None:
        try:
            results["server"] = server_handshake(b, IDENTITY, server_key, FrameLimits())
        except Exception as exc:
            results["server"] = exc
        b.close()

    thread = threading.Thread(target=serve)
    thread.start()
    hello = Hello("data", "s1", new_nonce(), 3, 64)
    try:
        client: Identity | BaseException = client_handshake(a, hello, client_key, FrameLimits(), expected)
    except Exception as exc:
        client = exc
    a.close()
    thread.join(5)
    return client, results["server"]  # type: ignore[return-value]


def test_the_same_secret_opens_the_connection_both_ways() -> None:
    client, server = handshake(b"k", b"k")
    assert client == IDENTITY
    assert isinstance(server, Hello) and (server.role, server.conn, server.credits) == ("data", 3, 64)


def test_a_server_without_the_secret_is_refused_by_the_client() -> None:
    client, server = handshake(b"k", b"other")
    assert isinstance(client, NotAuthenticated) and "could not prove" in str(client)
    assert not isinstance(server, Hello)  # the client hung up before proving anything


def test_a_client_without_the_secret_is_refused_by_the_server() -> None:
    a, b = socket.socketpair()
    with a, b:
        hello = Hello("data", "thief", new_nonce())
        send_frame(a, encode(MessageType.HELLO, 0, [_json(dataclasses.asdict(hello))]))
        result: list[BaseException] = []

        def serve() -> None:
            try:
                server_handshake(b, IDENTITY, b"k", FrameLimits())
            except Exception as exc:
                result.append(exc)

        thread = threading.Thread(target=serve)
        thread.start()
        welcome = decode_welcome(recv_frame(a, FrameLimits()).buffers[0].tobytes())  # skips its proof
        proof = client_proof(b"a guess", hello, welcome)
        send_frame(a, encode(MessageType.AUTH, 0, [_json({"proof": proof})]))
        answer = recv_frame(a, FrameLimits())
        thread.join(5)
    assert answer.type == MessageType.ERROR and "not authenticated" in error_text(answer)
    assert isinstance(result[0], NotAuthenticated)


def _json(value: object) -> np.ndarray:
    return np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)


def test_a_server_holding_other_shards_is_a_mismatch() -> None:
    other = Identity(server=1, rows=100, dim=8, fingerprint="cd" * 32)
    client, _ = handshake(b"k", b"k", expected=other)
    assert isinstance(client, IdentityMismatch) and "plan expects" in str(client)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[1, 2]", "JSON object"),
        (b"not json", "JSON object"),
        (b'{"role": "data", "session": "s", "nonce": "00"}', "nonce"),
        (b'{"role": "boss", "session": "s", "nonce": "%s"}' % NONCE, "role"),
        (b'{"role": "data", "session": "s", "nonce": "%s", "credits": 0}' % NONCE, "credits"),
        (b'{"role": "data", "session": "s", "nonce": "%s", "conn": true}' % NONCE, "conn"),
        (b'{"role": "data", "nonce": "%s"}' % NONCE, "Hello"),
        (b'{"role": "data", "session": "s", "nonce": "x", "admin": 1}', "fields among"),
    ],
)
def test_hello_fields_are_validated(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_hello(raw)
