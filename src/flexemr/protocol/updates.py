"""The update messages (UPDATE, COMMIT, ABORT, CHANGES, STALE), typed, and their buffers.

    UPDATE   [int64 (3): version, token, sequence (-1: none), rows int64 (n): server-local,
              values float32 (n, dim), source uint8 (utf-8)]
             ->  [int64 (1): 0 staged, or w > 0: (source, sequence) was applied at version w]
    COMMIT   [int64 (2 + S): version, token, rows the update staged on each of the S servers]
             ->  [int64 (2): the server's version, the version the update's rows are applied at]
    ABORT    [int64 (2): version, token]  ->  [int64 (1): 1 that attempt is committed, 0 it never
             will be here (its stage is dropped)]
    CHANGES  [int64 (1): since]  ->  [int64 (2): version, truncated, versions int64 (k),
                                      tokens int64 (k), written int64 (k, S), keys int64 (m)]
    ROWS     [int64 (3): version, start, stop]  ->  [int64 (2): version, start, written uint8
                                      (stop - start), then per segment: rows int64 (k), stored
                                      uint8 (k, row bytes)]
    STALE    [int64 (1): the server's version]

A version is decided by embedding server 0 alone: the first COMMIT of (version, token) it accepts.
It accepts one only for an attempt staged on it (every attempt stages there, with or without rows)
and not aborted, and whose (source, sequence) it has not applied before, so each (source,
sequence) is applied at most once whatever the order. `token` (random, per attempt) tells two
updates that picked the same version apart: a server never applies rows another attempt staged,
and a COMMIT for a version already decided succeeds only with the token it was decided with.
`written` is the update's write set: a server commits a version only holding exactly the rows the
write set gives it, so one that lost its stage (or its log) refuses instead of claiming the version.
ROWS copies a replica's rows, exactly as stored, at one committed version: what a server that
cannot prove it holds a version resyncs from (`embedding_server.resync`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flexemr.protocol.frames import Frame, MessageType, encode

MAX_SOURCE_BYTES = 256
LATEST = 2**62
"""CHANGES since this: only the server's version."""


class BadUpdate(ValueError):
    """An update message a server refuses (bad rows, values, dims); sent back as an ERROR frame."""


@dataclass(frozen=True)
class StagedRows:
    """One UPDATE: rows of one server, for one version and attempt (`token`)."""

    version: int
    token: int
    rows: np.ndarray
    """int64 [n]: server-local rows."""
    values: np.ndarray
    """float32 [n, dim]."""
    source: str = "default"
    sequence: int | None = None

    def buffers(self) -> list[np.ndarray]:
        head = np.array([self.version, self.token, -1 if self.sequence is None else self.sequence])
        return [head.astype(np.int64), self.rows, self.values, np.frombuffer(self.source.encode(), np.uint8)]

    def frame(self, request_id: int) -> list[memoryview]:
        return encode(MessageType.UPDATE, request_id, self.buffers())

    @classmethod
    def parse(cls, frame: Frame, dim: int) -> StagedRows:
        b = frame.buffers
        if not (
            len(b) == 4
            and b[0].dtype == np.int64
            and b[0].shape == (3,)
            and b[1].dtype == np.int64
            and b[1].ndim == 1
            and b[2].dtype == np.float32
            and b[3].dtype == np.uint8
            and b[3].ndim == 1
        ):
            raise BadUpdate(
                "an update carries int64 [version, token, sequence], int64 rows [n], float32 values "
                "[n, dim] and a utf-8 source"
            )
        if b[2].shape != (b[1].size, dim):
            raise BadUpdate(f"values of shape {b[2].shape} for {b[1].size} rows of dim {dim}")
        if b[3].size > MAX_SOURCE_BYTES:
            raise BadUpdate(f"source name of {b[3].size} bytes exceeds {MAX_SOURCE_BYTES}")
        version, token, sequence = (int(x) for x in b[0])
        if version < 1:
            raise BadUpdate(f"version must be at least 1, got {version}")
        source = b[3].tobytes().decode(errors="replace")
        return cls(version, token, b[1], b[2], source, None if sequence < 0 else sequence)


def version_buffer(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def commit_buffer(version: int, token: int, written: np.ndarray) -> np.ndarray:
    """A COMMIT's buffer: version, token, then the rows the update staged on each server."""
    return np.concatenate([version_buffer(version, token), written.astype(np.int64)])


def parse_commit(frame: Frame, servers_at_least: int) -> tuple[int, int, np.ndarray]:
    """(version, token, written) of a COMMIT; BadUpdate when malformed."""
    b = frame.buffers
    if not (b and b[0].dtype == np.int64 and b[0].ndim == 1 and b[0].size >= 2 + servers_at_least):
        raise BadUpdate(
            f"a COMMIT carries int64 [version, token, rows per server (at least {servers_at_least})]"
        )
    written = b[0][2:]
    if (written < 0).any():
        raise BadUpdate("a COMMIT's rows per server must be non-negative")
    return int(b[0][0]), int(b[0][1]), written


def int64s(frame: Frame, count: int, what: str) -> list[int]:
    """The first buffer of `frame` as `count` ints; BadUpdate when it is not int64 [count]."""
    if not frame.buffers or frame.buffers[0].dtype != np.int64 or frame.buffers[0].shape != (count,):
        raise BadUpdate(f"{what} carries int64 [{count}]")
    return [int(x) for x in frame.buffers[0]]


@dataclass(frozen=True)
class Changes:
    """A server's answer to CHANGES: its version, and what changed after `since`."""

    version: int
    truncated: bool
    versions: np.ndarray
    """int64 [k]: the versions committed after `since`, in order."""
    tokens: np.ndarray
    """int64 [k]: the token each was committed with."""
    written: np.ndarray
    """int64 [k, S]: the rows each staged on each server (what a COMMIT of it carries)."""
    keys: np.ndarray
    """int64 [m]: the global cache keys those versions changed."""

    def frame(self, request_id: int) -> list[memoryview]:
        head = version_buffer(self.version, int(self.truncated))
        buffers = [head, self.versions, self.tokens, self.written, self.keys]
        return encode(MessageType.CHANGES, request_id, buffers)

    @classmethod
    def parse(cls, frame: Frame) -> Changes:
        b = frame.buffers
        if not (
            len(b) == 5
            and all(x.dtype == np.int64 for x in b)
            and all(b[i].ndim == 1 for i in (0, 1, 2, 4))
            and b[0].size == 2
            and b[3].ndim == 2
        ):
            raise BadUpdate(
                "a CHANGES answer carries int64 [version, truncated], versions, tokens, written [k, S], keys"
            )
        if not b[1].size == b[2].size == b[3].shape[0]:
            raise BadUpdate(f"{b[1].size} versions but {b[2].size} tokens and {b[3].shape[0]} write sets")
        return cls(int(b[0][0]), bool(b[0][1]), b[1], b[2], b[3], b[4])


@dataclass(frozen=True)
class RowsCopy:
    """A replica's answer to ROWS: its server-local rows [start, start + written.size) as stored at
    `version`, per segment of its store (rows within the segment, their stored bytes)."""

    version: int
    start: int
    written: np.ndarray
    """uint8 [n]: 1 for each row written since the checkpoint (what a snapshot keeps)."""
    parts: tuple[tuple[np.ndarray, np.ndarray], ...]
    """Per segment: int64 rows [k], uint8 stored bytes [k, row bytes]."""

    def frame(self, request_id: int) -> list[memoryview]:
        buffers = [version_buffer(self.version, self.start), self.written]
        for rows, stored in self.parts:
            buffers += [rows, stored]
        return encode(MessageType.ROWS, request_id, buffers)

    @classmethod
    def parse(cls, frame: Frame) -> RowsCopy:
        b = frame.buffers
        if not (
            len(b) >= 2
            and len(b) % 2 == 0
            and b[0].dtype == np.int64
            and b[0].shape == (2,)
            and b[1].dtype == np.uint8
            and b[1].ndim == 1
            and all(r.dtype == np.int64 and r.ndim == 1 for r in b[2::2])
            and all(s.dtype == np.uint8 and s.ndim == 2 for s in b[3::2])
        ):
            raise BadUpdate(
                "a ROWS answer carries int64 [version, start], uint8 written [n], then per segment "
                "int64 rows [k] and uint8 stored bytes [k, row bytes]"
            )
        parts = tuple(zip(b[2::2], b[3::2], strict=True))
        if any(rows.size != stored.shape[0] for rows, stored in parts):
            raise BadUpdate("a ROWS answer names as many rows as it carries stored rows, per segment")
        return cls(int(b[0][0]), int(b[0][1]), b[1], parts)
