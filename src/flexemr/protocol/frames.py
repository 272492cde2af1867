"""The binary frame format between rankers and embedding servers.

    header (24 bytes, little-endian)
    +-------+---------+------+-------+------------+-------------+------------+
    | magic | version | type | flags | request id | buffer count| body bytes |
    | 4s    | u8      | u8   | u16   | u64        | u32         | u32        |
    +-------+---------+------+-------+------------+-------------+------------+
    then one 12-byte descriptor per buffer: dtype u8, ndim u8, pad u16, dim0 u32, dim1 u32
    then the buffers' bytes, back to back, in descriptor order.

Arrays go out from their own memory (`sendmsg` over a list of memoryviews) and come in with
`recv_into` straight into arrays allocated for them, after every header field and descriptor has
been checked against `FrameLimits`. A frame that breaks a rule raises `ProtocolError`; the receiver
closes that connection and keeps serving its others.
"""

from __future__ import annotations

import enum
import math
import socket
import ssl
import struct
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np

from flexemr.config import FrameLimits

MAGIC = b"FXEM"
VERSION = 1
HEADER = struct.Struct("<4sBBHQII")
DESCRIPTOR = struct.Struct("<BBxxII")
MAX_QUEUED_RESPONSES = 256
"""Answers a credited connection holds back for want of credits before it stops reading."""


class MessageType(enum.IntEnum):
    HELLO = 1
    """Opens a connection, both ways: `handshake.Hello` then `handshake.Welcome` (JSON bytes)."""
    LOOKUP = 2
    """ranker -> server: [rows (n), bag offsets (bags), optional weights float32 (n)]; rows and
    offsets are both int32, or both int64 for a server of 2^31 rows or more."""
    RESULT = 3
    """server -> ranker: [values float32 (bags or n, dim)]."""
    ERROR = 4
    """server -> ranker: [utf-8 message uint8]; the request failed, the connection lives on."""
    PING = 5
    """ranker -> server on the control connection: a heartbeat (flag STATS: ask for credit stats);
    on a data connection: a keepalive, never answered."""
    PONG = 6
    """server -> ranker: the answer to a PING, same request id ([stats JSON uint8] with STATS)."""
    CREDIT = 7
    """ranker -> server: credits for responses. On a control connection: [data connection ids
    int64 (k), grants int64 (k), sent at int64 (1): time.monotonic_ns of the grant]; on a data
    connection (piggyback mode, nothing to piggyback on): [grants, sent at: int64 (1 or 2)]. Never
    answered."""
    AUTH = 8
    """ranker -> server: `handshake` proof of the secret; server -> ranker, empty: accepted."""
    UPDATE = 9
    """updater -> server: stage rows for a version (`protocol.updates`); answered UPDATE [int64
    (1): 1 staged, 0 a duplicate of a committed (source, sequence)], STALE or ERROR."""
    COMMIT = 10
    """updater or ranker -> server: [int64 (2 + S): version, token, rows staged per server], apply
    what that update staged; answered COMMIT [int64 (2): the server's version, the version the
    update is applied at], STALE when the version is taken by another update or the server is
    behind it (it must commit the versions before first), or ERROR (`protocol.updates`)."""
    STALE = 11
    """server -> ranker or updater: [int64 (1): the server's committed version]; the request named
    another version than the server's (a LOOKUP with flag VERSIONED), or a version already decided."""
    CHANGES = 12
    """ranker or updater -> server: [int64 (1): since]; answered CHANGES [int64 (2): version,
    truncated (1: the changelog no longer reaches back to `since`), versions int64 (k), tokens int64
    (k): the versions committed after `since`, written int64 (k, S): rows each staged per server,
    keys int64 (m): the global cache keys they changed]."""
    ABORT = 13
    """updater -> server: [int64 (2): version, token], drop that attempt's stage; answered ABORT
    [int64 (1): 1 that attempt is committed here, 0 it is not (and, on server 0, never will be)]."""
    ROWS = 14
    """resyncing server -> replica: [int64 (3): version, start, stop], the stored bytes of the
    replica's server-local rows [start, stop) at that committed version; answered ROWS (`protocol.
    updates.RowsCopy`), or STALE when the replica cannot answer at that version."""


class Flags(enum.IntFlag):
    NONE = 0
    RAW = 1
    """LOOKUP: return the rows themselves, not per-bag partial sums."""
    WEIGHTED = 2
    """LOOKUP: a third buffer holds per-index weights."""
    CREDIT = 4
    """LOOKUP: the last buffer, int64 [credits] or [credits, sent at ns], grants response credits."""
    STATS = 8
    """PING: answer with this session's credit statistics."""
    VERSIONED = 16
    """LOOKUP: the buffer after the weights, int64 [version], is the version the ranker reads; a
    server at another version answers STALE."""


_DTYPES: dict[int, np.dtype[np.generic]] = {
    1: np.dtype(np.int64),
    2: np.dtype(np.int32),
    3: np.dtype(np.float32),
    4: np.dtype(np.uint8),
    5: np.dtype(np.float16),
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


class ProtocolError(Exception):
    """A frame broke the format or a limit; the connection it came on must be closed."""


class ConnectionClosed(ConnectionError):
    """The peer closed the connection (between frames, or in the middle of one)."""


@dataclass
class Frame:
    type: MessageType
    request_id: int
    flags: int
    buffers: list[np.ndarray]


def encode(
    msg_type: MessageType, request_id: int, buffers: Sequence[np.ndarray], flags: int = 0
) -> list[memoryview]:
    """The frame as a list of views for `sendmsg`; array data is not copied."""
    parts: list[memoryview] = []
    descriptors = bytearray()
    body = 0
    for array in buffers:
        if array.ndim not in (1, 2) or array.dtype not in _CODES:
            raise ValueError(f"cannot frame an array of shape {array.shape} and dtype {array.dtype}")
        array = np.ascontiguousarray(array)
        shape = (*array.shape, 0) if array.ndim == 1 else array.shape
        descriptors += DESCRIPTOR.pack(_CODES[array.dtype], array.ndim, shape[0], shape[1])
        parts.append(array.data.cast("B") if array.size else memoryview(b""))  # (0, dim) cannot cast
        body += array.nbytes
    header = HEADER.pack(MAGIC, VERSION, msg_type, flags, request_id, len(buffers), body)
    return [memoryview(header + descriptors), *parts]


def send_frame(sock: socket.socket, views: list[memoryview]) -> None:
    """Send all views, resuming after partial sends (large frames outgrow the socket buffer)."""
    if isinstance(sock, ssl.SSLSocket):  # no sendmsg over TLS; encryption copies anyway
        sock.sendall(b"".join(views))
        return
    views = [v for v in views if v.nbytes]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


ReadInto = Callable[[memoryview], int | None]
"""`socket.recv_into`, or a file's `readinto`: fills a view, returns the bytes read (0: the end)."""


def _recv_exact(read_into: ReadInto, view: memoryview) -> None:
    got = 0
    while got < view.nbytes:
        n = read_into(view[got:])
        if not n:
            raise ConnectionClosed("connection closed by peer")
        got += n


def parse_header(header: bytes | bytearray, limits: FrameLimits) -> tuple[MessageType, int, int, int, int]:
    """(type, flags, request id, buffer count, body bytes) of a frame header, checked against limits."""
    magic, version, msg_type, flags, request_id, count, body = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}, this side speaks {VERSION}")
    try:
        kind = MessageType(msg_type)
    except ValueError:
        raise ProtocolError(f"unknown message type {msg_type}") from None
    if count > limits.max_buffers:
        raise ProtocolError(f"{count} buffers exceeds the limit of {limits.max_buffers}")
    if body > limits.max_frame_bytes:
        raise ProtocolError(f"body of {body} bytes exceeds the limit of {limits.max_frame_bytes}")
    return kind, flags, request_id, count, body


def parse_descriptors(
    raw: bytes | bytearray, count: int, body: int, limits: FrameLimits
) -> list[tuple[np.dtype[np.generic], tuple[int, ...]]]:
    """The (dtype, shape) of each buffer, checked, and checked to add up to `body` bytes."""
    shapes: list[tuple[np.dtype[np.generic], tuple[int, ...]]] = []
    declared = 0
    for i in range(count):
        code, ndim, dim0, dim1 = DESCRIPTOR.unpack_from(raw, i * DESCRIPTOR.size)
        if code not in _DTYPES:
            raise ProtocolError(f"buffer {i}: unknown dtype code {code}")
        if ndim not in (1, 2) or (ndim == 1 and dim1 != 0):
            raise ProtocolError(f"buffer {i}: bad shape, ndim={ndim} dims=({dim0}, {dim1})")
        if max(dim0, dim1) > limits.max_dim:
            raise ProtocolError(f"buffer {i}: dimension over the limit of {limits.max_dim}")
        shape = (dim0,) if ndim == 1 else (dim0, dim1)
        declared += dim0 * (dim1 if ndim == 2 else 1) * _DTYPES[code].itemsize
        shapes.append((_DTYPES[code], shape))
    if declared != body:
        raise ProtocolError(f"buffers declare {declared} bytes but the header says {body}")
    return shapes


def recv_frame(sock: socket.socket, limits: FrameLimits) -> Frame:
    """Read one frame, validating everything before allocating the buffers it declares."""
    return read_frame(sock.recv_into, limits)


def read_frame(
    read_into: ReadInto, limits: FrameLimits, expect: Collection[MessageType] | None = None
) -> Frame:
    """`recv_frame` from any source of bytes (a socket, a file); with `expect`, a frame of another
    type is refused from its header, before the rest is read."""
    header = bytearray(HEADER.size)
    _recv_exact(read_into, memoryview(header))
    kind, flags, request_id, count, body = parse_header(header, limits)
    if expect is not None and kind not in expect:
        raise ProtocolError(f"expected {' or '.join(k.name for k in expect)}, got {kind.name}")
    raw = bytearray(DESCRIPTOR.size * count)
    _recv_exact(read_into, memoryview(raw))
    buffers = []
    for dtype, shape in parse_descriptors(raw, count, body, limits):
        array = np.empty(shape, dtype=dtype)
        if array.size:
            _recv_exact(read_into, array.data.cast("B"))
        buffers.append(array)
    return Frame(kind, request_id, flags, buffers)


KEPT_BUFFER_BYTES = 4 * 2**20
"""The largest receive buffer a `FrameReader` keeps between frames (so at most this much per
connection stays resident); a larger frame is read into a buffer of its own, dropped after it."""

_FIRST_BUFFER_BYTES = 64 * 2**10


class FrameReader:
    """Frames from one connection, received into one reused buffer (a server's data connection).

    Each `recv_into` takes all that has arrived, up to the room in the buffer (the next frame's
    first bytes included), so a frame costs one call where its bytes arrive together, instead of
    one per header, descriptors and array; and no allocation per frame. (`read_ahead=False` for a
    source that fills all of the view it is given, a UCX stream: then a call asks for the header,
    then for the rest of the frame.) Every header field and descriptor is checked against
    `FrameLimits` before the buffer grows for the frame's body.

    The arrays of a frame of a type in `views` are views into the buffer, valid until the next
    `read` (the caller is done with them by then: a lookup's indices); other frames' arrays are
    their own (an update's rows outlive the read). An array that would not be aligned for its
    dtype is copied. The buffer is allocated uninitialised (`np.empty`): a body declared but not
    sent costs address space, not memory, as a frame's own arrays did.

        buffer:  [ frame read, views handed out | next frame's first bytes | room ]
                                                ^ start                    ^ end
    """

    def __init__(
        self,
        read_into: ReadInto,
        limits: FrameLimits,
        views: Collection[MessageType] = (),
        read_ahead: bool = True,
    ) -> None:
        self._read_into = read_into
        self._read_ahead = read_ahead
        self._limits = limits
        self._views = frozenset(views)
        self._buffer = np.empty(_FIRST_BUFFER_BYTES, np.uint8)
        self._start = 0
        self._end = 0

    def read(self) -> Frame:
        if self._start == self._end:  # nothing of the next frame yet: start at the front
            self._start = self._end = 0
        self._fill(HEADER.size)
        kind, flags, request_id, count, body = parse_header(
            self._buffer[self._start : self._start + HEADER.size].tobytes(), self._limits
        )
        size = HEADER.size + DESCRIPTOR.size * count + body
        self._fill(size)
        at = self._start + HEADER.size
        raw = self._buffer[at : at + DESCRIPTOR.size * count].tobytes()
        at += len(raw)
        own = kind not in self._views
        buffers = []
        for dtype, shape in parse_descriptors(raw, count, body, self._limits):
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes == 0:
                array = np.empty(shape, dtype=dtype)
            else:
                array = self._buffer[at : at + nbytes].view(dtype).reshape(shape)
                if own or not array.flags.aligned:
                    array = array.copy()
            buffers.append(array)
            at += nbytes
        self._start += size
        return Frame(kind, request_id, flags, buffers)

    def _fill(self, size: int) -> None:
        """Have `size` bytes from `start` in the buffer, receiving what is missing."""
        if self._end - self._start >= size:
            return
        if self._start + size > self._buffer.size or self._buffer.size > KEPT_BUFFER_BYTES:
            # Move what has arrived to the front of a buffer with room for `size` (the previous
            # frame's views are done with): a bigger one if needed, the usual one after a big frame.
            unread = self._end - self._start
            room = max(size, _FIRST_BUFFER_BYTES)
            if size <= KEPT_BUFFER_BYTES:
                room = min(1 << (room - 1).bit_length(), KEPT_BUFFER_BYTES)
            if room > self._buffer.size or self._buffer.size > KEPT_BUFFER_BYTES:
                buffer = np.empty(max(room, unread), np.uint8)
                buffer[:unread] = self._buffer[self._start : self._end]
                self._buffer = buffer
            else:
                self._buffer[:unread] = self._buffer[self._start : self._end]
            self._start, self._end = 0, unread
        view = self._buffer.data[: None if self._read_ahead else self._start + size]
        while self._end - self._start < size:
            n = self._read_into(view[self._end :])
            if not n:
                raise ConnectionClosed("connection closed by peer")
            self._end += n


def error_frame(request_id: int, message: str) -> list[memoryview]:
    return encode(MessageType.ERROR, request_id, [np.frombuffer(message.encode(), dtype=np.uint8)])


def error_text(frame: Frame) -> str:
    return frame.buffers[0].tobytes().decode(errors="replace") if frame.buffers else "unknown error"
