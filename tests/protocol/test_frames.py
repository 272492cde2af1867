from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import numpy as np
import pytest

from flexemr.config import Endpoint, FrameLimits
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.local import LocalCluster
from flexemr.model.source import model_spec
from flexemr.protocol.frames import (
    DESCRIPTOR,
    HEADER,
    MAGIC,
    VERSION,
    MessageType,
    ProtocolError,
    encode,
    error_text,
    recv_frame,
    send_frame,
)
from flexemr.sharding.plan import make_plan
from flexemr.transport.base import LookupRequest
from tests.engine.helpers import dial, lookup_frame


def roundtrip(views: list[memoryview], limits: FrameLimits | None = None):  # type: ignore[no-untyped-def]
    a, b = socket.socketpair()
    with a, b:
        send_frame(a, views)
        return recv_frame(b, limits or FrameLimits())


def raw_frame(header: bytes, rest: bytes = b"") -> list[memoryview]:
    return [memoryview(header + rest)]


def test_arrays_round_trip_exactly() -> None:
    rows = np.arange(10, dtype=np.int64)
    table = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    frame = roundtrip(encode(MessageType.RESULT, 42, [rows, table, np.empty(0, np.int64)], flags=1))
    assert (frame.type, frame.request_id, frame.flags) == (MessageType.RESULT, 42, 1)
    np.testing.assert_array_equal(frame.buffers[0], rows)
    np.testing.assert_array_equal(frame.buffers[1], table)
    assert frame.buffers[2].shape == (0,)


@pytest.mark.parametrize(
    ("views", "message"),
    [
        (raw_frame(HEADER.pack(b"NOPE", VERSION, 2, 0, 1, 0, 0)), "bad magic"),
        (raw_frame(HEADER.pack(MAGIC, 9, 2, 0, 1, 0, 0)), "unsupported protocol version 9"),
        (raw_frame(HEADER.pack(MAGIC, VERSION, 99, 0, 1, 0, 0)), "unknown message type 99"),
        (raw_frame(HEADER.pack(MAGIC, VERSION, 2, 0, 1, 1000, 0)), "1000 buffers exceeds"),
        (raw_frame(HEADER.pack(MAGIC, VERSION, 2, 0, 1, 1, 2**31)), "exceeds the limit"),
        (
            raw_frame(HEADER.pack(MAGIC, VERSION, 2, 0, 1, 1, 8), DESCRIPTOR.pack(77, 1, 1, 0)),
            "unknown dtype",
        ),
        (raw_frame(HEADER.pack(MAGIC, VERSION, 2, 0, 1, 1, 8), DESCRIPTOR.pack(1, 3, 1, 0)), "bad shape"),
        (
            raw_frame(HEADER.pack(MAGIC, VERSION, 2, 0, 1, 1, 8), DESCRIPTOR.pack(1, 1, 5, 0)),
            "declare 40 bytes",
        ),
    ],
)
def test_malformed_headers_are_refused_before_allocation(views: list[memoryview], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        roundtrip(views)


@pytest.fixture(scope="module")
def server_endpoint() -> Iterator[Endpoint]:
    source = ModelSource(preset="tiny")
    spec = model_spec(source)
    plan = make_plan("table", spec.table_rows, spec.dim, 1)
    with LocalCluster(ClusterSpec(source, plan, (Endpoint(),))) as cluster:
        yield cluster.spec.embedding_servers[0]


def test_malformed_frame_closes_only_that_connection(server_endpoint: Endpoint) -> None:
    good = dial(server_endpoint)
    bad = socket.create_connection((server_endpoint.host, server_endpoint.port), timeout=10)
    with good, bad:
        bad.sendall(b"garbage that is not a frame at all")
        try:  # one ERROR, then the server closes the bad connection...
            assert recv_frame(bad, FrameLimits()).type == MessageType.ERROR
            assert bad.recv(1) == b""
        except ConnectionResetError:
            pass  # ...or resets it, having left our garbage unread
        send_frame(good, lookup_frame(5, LookupRequest(np.array([1, 2], np.int64), np.array([0], np.int64))))
        frame = recv_frame(good, FrameLimits())
        assert frame.type == MessageType.RESULT and frame.buffers[0].shape == (1, 8)


def test_bad_subrequest_gets_error_and_connection_lives(server_endpoint: Endpoint) -> None:
    with dial(server_endpoint) as conn:
        send_frame(conn, lookup_frame(1, LookupRequest(np.array([10**6], np.int64), np.array([0], np.int64))))
        frame = recv_frame(conn, FrameLimits())
        assert frame.type == MessageType.ERROR and "outside this server's" in error_text(frame)
        send_frame(conn, lookup_frame(2, LookupRequest(np.array([3], np.int64), np.array([0], np.int64))))
        assert recv_frame(conn, FrameLimits()).type == MessageType.RESULT
    assert struct.calcsize("<q") == 8


def test_server_takes_int32_and_int64_lookups_alike(server_endpoint: Endpoint) -> None:
    results = []
    with dial(server_endpoint) as conn:
        for i, dtype in enumerate((np.int64, np.int32)):
            request = LookupRequest(np.array([1, 2, 5], dtype), np.array([0, 2], dtype))
            send_frame(conn, lookup_frame(i, request))
            frame = recv_frame(conn, FrameLimits())
            assert frame.type == MessageType.RESULT
            results.append(frame.buffers[0])
        send_frame(conn, lookup_frame(9, LookupRequest(np.array([1], np.int32), np.array([0], np.int64))))
        frame = recv_frame(conn, FrameLimits())
        assert frame.type == MessageType.ERROR and "both int32 or both int64" in error_text(frame)
    np.testing.assert_array_equal(results[0], results[1])
