"""Row updates from a Redis Stream, read by a consumer group: at-least-once delivery made exact.

An entry holds one batch of rows as raw little-endian bytes (any language can XADD them):

    XADD rows * table <int64 [n]> row <int64 [n]> values <float32 [n, dim]>

    loop:  XREADGROUP its pending entries first ("0": delivered before a crash, never acked),
           then new ones (">"), up to `batch` entries at a time
           -> decode and check each entry (a bad one goes to STREAM:rejected with its error, acked)
           -> apply the good ones as one row version: source = the stream, sequence = the last
              entry's id; servers skip a (source, sequence) already committed
           -> XACK only once that version is committed

A consumer killed anywhere resumes from its pending entries: a batch it committed but did not ack
is skipped by the servers as a duplicate, one it did not commit is applied. Entry ids grow along
the stream, so with one consumer per group a later entry's rows always win. (Several consumers in
one group would apply batches out of stream order: run one per group.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from flexemr.extras import needs_extra
from flexemr.model.spec import ModelSpec
from flexemr.updates.metrics import UpdateMetrics
from flexemr.updates.rows import RowUpdates

with needs_extra("redis"):
    import redis

log = logging.getLogger(__name__)

SEQUENCE_BITS = 20
"""An entry id `ms-n` is the sequence `ms << 20 | n` (n below 2^20 entries per millisecond)."""

Entry = tuple[bytes, dict[bytes, bytes]]


@dataclass(frozen=True)
class StreamConfig:
    url: str
    """The Redis, e.g. redis://127.0.0.1:6379/0."""
    stream: str
    group: str
    consumer: str = "flexemr-update"
    """Keep it across restarts: a consumer's pending entries are read back under its name."""
    batch: int = 64
    """Entries applied together as one row version."""
    block_ms: int = 1000
    """How long one read waits for new entries."""

    def __post_init__(self) -> None:
        if self.batch < 1 or self.block_ms < 1:
            raise ValueError(f"batch and block_ms must be positive, got {self.batch}, {self.block_ms}")


def sequence_of(entry_id: bytes) -> int:
    ms, _, n = entry_id.decode().partition("-")
    if int(n) >= 1 << SEQUENCE_BITS:
        raise ValueError(f"entry {entry_id!r}: more than 2^{SEQUENCE_BITS} entries in one millisecond")
    return int(ms) << SEQUENCE_BITS | int(n)


def decode_entry(entry_id: bytes, fields: dict[bytes, bytes], spec: ModelSpec, source: str) -> RowUpdates:
    """The rows of one entry, checked against the model; ValueError naming the field otherwise."""
    missing = [name for name in (b"table", b"row", b"values") if name not in fields]
    if missing:
        raise ValueError(f"entry lacks field(s) {[m.decode() for m in missing]} (needs table, row, values)")
    sizes = {name: len(fields[name]) for name in (b"table", b"row", b"values")}
    n = sizes[b"table"] // 8
    expected = {b"table": 8 * n, b"row": 8 * n, b"values": 4 * n * spec.dim}
    for name, size in sizes.items():
        if size != expected[name]:
            raise ValueError(
                f"field {name.decode()}: {size} bytes, expected {expected[name]} for {n} rows of dim "
                f"{spec.dim} (table, row: int64; values: float32, little-endian)"
            )
    updates = RowUpdates(
        np.frombuffer(fields[b"table"], dtype="<i8"),
        np.frombuffer(fields[b"row"], dtype="<i8"),
        np.frombuffer(fields[b"values"], dtype="<f4").reshape(n, spec.dim),
        source,
        sequence_of(entry_id),
    )
    updates.check(spec)
    return updates


class StreamConsumer:
    def __init__(
        self,
        config: StreamConfig,
        model: Callable[[], ModelSpec],
        apply: Callable[[RowUpdates], int],
        metrics: UpdateMetrics,
    ) -> None:
        """`model`: the model entries are checked against now (the serving version's); `apply`:
        applies a batch as one row version and returns it."""
        self.config = config
        self.model = model
        self.apply = apply
        self.metrics = metrics
        self.client = redis.Redis.from_url(config.url)
        self.applied_entries = 0

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.config.stream, self.config.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, pending: bool) -> list[Entry]:
        c = self.config
        streams: dict[Any, Any] = {c.stream: "0" if pending else ">"}
        block = None if pending else c.block_ms
        answer: Any = self.client.xreadgroup(c.group, c.consumer, streams, count=c.batch, block=block)
        return [(entry_id, fields) for _, entries in answer or [] for entry_id, fields in entries if fields]

    def handle(self, entries: list[Entry]) -> None:
        """Apply `entries` as one version, then ack them; bad entries are set aside and acked."""
        good: list[RowUpdates] = []
        model = self.model()
        for entry_id, fields in entries:
            try:
                good.append(decode_entry(entry_id, fields, model, self.config.stream))
            except ValueError as exc:
                log.warning("stream %s entry %s rejected: %s", self.config.stream, entry_id.decode(), exc)
                self.client.xadd(f"{self.config.stream}:rejected", {"id": entry_id, "error": str(exc)})
                self.metrics.refused.labels("bad_entry").inc()
        if good:
            merged = RowUpdates(
                np.concatenate([u.tables for u in good]),
                np.concatenate([u.rows for u in good]),
                np.concatenate([u.values for u in good]),
                self.config.stream,
                good[-1].sequence,
            )
            version = self.apply(merged)  # raises: nothing acked, the entries stay pending
            now_ms = time.time() * 1000
            lags = [(now_ms - ((u.sequence or 0) >> SEQUENCE_BITS)) / 1000 for u in good]  # entry time
            self.metrics.committed(version, int(merged.rows.size), lags)
            self.applied_entries += len(good)
        self.client.xack(self.config.stream, self.config.group, *[entry_id for entry_id, _ in entries])

    def run(self, stop: threading.Event, retry_s: float = 1.0) -> None:
        """Consume until `stop`; failures (Redis or servers away) are retried from the pending entries."""
        self.ensure_group()
        pending = True
        while not stop.is_set():
            try:
                entries = self.read(pending)
                if not entries:
                    pending = False  # caught up with what was delivered before
                    continue
                self.handle(entries)
            except (redis.RedisError, OSError, RuntimeError) as exc:
                log.warning("stream %s: %s; retrying in %.1f s", self.config.stream, exc, retry_s)
                self.metrics.refused.labels(type(exc).__name__).inc()
                pending = True
                stop.wait(retry_s)

    def close(self) -> None:
        self.client.close()
