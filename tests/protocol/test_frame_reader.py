"""`FrameReader`: frames received into one reused buffer, however their bytes arrive, checked
against the limits before the buffer grows, lookups' arrays as views and every other frame's
arrays its own."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from flexemr.config import FrameLimits
from flexemr.protocol import frames
from flexemr.protocol.frames import (
    DESCRIPTOR,
    HEADER,
    MAGIC,
    VERSION,
    ConnectionClosed,
    Flags,
    FrameReader,
    MessageType,
    ProtocolError,
    encode,
)


def stream(data: bytes, chunk: int) -> Callable[[memoryview], int]:
    """A `recv_into` over `data` that gives at most `chunk` bytes a call (0 at the end)."""
    at = [0]

    def read_into(view: memoryview) -> int:
        n = min(chunk, view.nbytes, len(data) - at[0])
        view[:n] = data[at[0] : at[0] + n]
        at[0] += n
        return n

    return read_into


def wire(*frames_: list[memoryview]) -> bytes:
    return b"".join(bytes(v) for views in frames_ for v in views)


ROWS = np.arange(7, dtype=np.int32) * 3  # 7 int32: the int64 after them starts 4 bytes off 8
OFFSETS = np.array([0, 2, 5], dtype=np.int32)
VERSION_BUFFER = np.array([12], dtype=np.int64)
UPDATE_ROWS = np.arange(4, dtype=np.int64)


@pytest.mark.parametrize("chunk", [1, 5, 24, 1 << 20])
def test_frames_back_to_back_read_alike_however_their_bytes_arrive(chunk: int) -> None:
    data = wire(
        encode(MessageType.LOOKUP, 1, [ROWS, OFFSETS, VERSION_BUFFER], Flags.VERSIONED),
        encode(MessageType.PING, 2, []),
        encode(MessageType.UPDATE, 3, [UPDATE_ROWS, np.ones((4, 2), np.float32)]),
        encode(MessageType.LOOKUP, 4, [np.empty(0, np.int32), np.empty(0, np.int32)]),
    )
    reader = FrameReader(stream(data, chunk), FrameLimits(), views=(MessageType.LOOKUP,))
    lookup = reader.read()
    assert (lookup.type, lookup.request_id, lookup.flags) == (MessageType.LOOKUP, 1, Flags.VERSIONED)
    np.testing.assert_array_equal(lookup.buffers[0], ROWS)
    np.testing.assert_array_equal(lookup.buffers[1], OFFSETS)
    assert lookup.buffers[2].flags.aligned and int(lookup.buffers[2][0]) == 12  # copied to align it
    assert not lookup.buffers[0].flags.owndata  # a view into the receive buffer
    assert reader.read().type == MessageType.PING
    update = reader.read()
    assert all(b.flags.owndata for b in update.buffers)  # outlives the next read
    empty = reader.read()
    assert empty.request_id == 4 and [b.shape for b in empty.buffers] == [(0,), (0,)]
    np.testing.assert_array_equal(update.buffers[0], UPDATE_ROWS)
    with pytest.raises(ConnectionClosed):
        reader.read()


def test_without_read_ahead_a_call_never_asks_past_the_frame() -> None:
    """A UCX stream fills all of the view it is given: asked for more than the frame, it would wait
    for the next frame's bytes."""
    data = wire(encode(MessageType.LOOKUP, 1, [ROWS, OFFSETS]), encode(MessageType.PING, 2, []))
    first_frame = len(wire(encode(MessageType.LOOKUP, 1, [ROWS, OFFSETS])))
    source = stream(data, 1 << 20)
    asked: list[int] = []

    def fill_all(view: memoryview) -> int:
        asked.append(view.nbytes)
        return source(view)

    reader = FrameReader(fill_all, FrameLimits(), read_ahead=False)
    np.testing.assert_array_equal(reader.read().buffers[0], ROWS)
    assert asked == [HEADER.size, first_frame - HEADER.size]
    assert reader.read().type == MessageType.PING


def test_a_frame_over_the_limits_is_refused_before_the_buffer_grows() -> None:
    header = HEADER.pack(MAGIC, VERSION, MessageType.LOOKUP, 0, 1, 1, 2**30)
    reader = FrameReader(
        stream(header + DESCRIPTOR.pack(3, 1, 2**28, 0), 1 << 20), FrameLimits(max_frame_bytes=2**20)
    )
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        reader.read()
    assert reader._buffer.size <= 64 * 2**10


def test_a_frame_bigger_than_the_kept_buffer_gets_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frames, "KEPT_BUFFER_BYTES", 100_000)
    big = np.arange(200_000, dtype=np.int32)
    data = wire(encode(MessageType.LOOKUP, 1, [big]), encode(MessageType.LOOKUP, 2, [ROWS]))
    reader = FrameReader(stream(data, 65_536), FrameLimits(), views=(MessageType.LOOKUP,))
    np.testing.assert_array_equal(reader.read().buffers[0], big)
    np.testing.assert_array_equal(reader.read().buffers[0], ROWS)
    assert reader._buffer.size <= 100_000  # back to a kept size after the big frame


def test_a_connection_closed_mid_frame_is_closed() -> None:
    data = wire(encode(MessageType.LOOKUP, 1, [ROWS, OFFSETS]))
    reader = FrameReader(stream(data[:-3], 7), FrameLimits())
    with pytest.raises(ConnectionClosed):
        reader.read()
