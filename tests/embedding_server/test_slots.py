"""The connection slots alone, on socket pairs: who is shut when they are full."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from flexemr.embedding_server.slots import ConnectionSlots, SlotsFull


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """Socket pairs: (the server's end, the peer's end); all closed afterwards."""
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for a, b in made:
        a.close()
        b.close()


def pair(made: list[tuple[socket.socket, socket.socket]]) -> tuple[socket.socket, socket.socket]:
    made.append(socket.socketpair())
    made[-1][1].settimeout(10)
    return made[-1]


def shut(peer: socket.socket) -> bool:
    """The server's end of this pair was shut (the peer reads the end)."""
    peer.setblocking(False)
    try:
        return peer.recv(1) == b""
    except BlockingIOError:
        return False


def test_a_full_handshake_budget_shuts_the_oldest_handshake_never_a_proven_one(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    slots = ConnectionSlots(limit=10, handshakes=2)
    proven, first, second, third = (pair(pairs) for _ in range(4))
    assert slots.admit(proven[0]) is None and slots.prove(proven[0])
    assert slots.admit(first[0]) is None and slots.admit(second[0]) is None
    assert slots.admit(third[0]) == "handshake slots full"
    assert shut(first[1]) and not shut(second[1]) and not shut(proven[1])
    assert not slots.prove(first[0])  # it lost its slot: it may not serve
    assert slots.held() == (2, 1)


def test_at_the_connection_limit_a_newcomer_takes_a_handshake_slot_until_all_are_proven(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    slots = ConnectionSlots(limit=3, handshakes=3)
    a, b, c, d, e = (pair(pairs) for _ in range(5))
    for conn in (a, b, c):
        assert slots.admit(conn[0]) is None
    assert slots.prove(a[0]) and slots.prove(b[0])
    assert slots.admit(d[0]) == "connection limit"  # c was still in its handshake
    assert shut(c[1]) and slots.prove(d[0])
    with pytest.raises(SlotsFull):
        slots.admit(e[0])
    slots.release(a[0])
    assert slots.admit(e[0]) is None
    assert not any(shut(x[1]) for x in (a, b, d, e))


def test_tls_takes_over_the_slot_and_a_dropped_connection_frees_its_descriptor(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    slots = ConnectionSlots(limit=4, handshakes=4)
    raw, wrapped, other = pair(pairs), pair(pairs), pair(pairs)
    slots.admit(raw[0])
    slots.admit(other[0])
    assert slots.replace(raw[0], wrapped[0]) is wrapped[0]
    assert slots.drop_oldest_handshake() and shut(wrapped[1])  # the wrapped one kept raw's place
    assert not shut(other[1]) and slots.held() == (1, 0)
    assert slots.drop_oldest_handshake() and not slots.drop_oldest_handshake()
