"""A Redis-backed embedding tier, the design of HugeCTR's parameter server: a baseline.

Rows live in one Redis as binary key -> row bytes (key: server id and server-local row, 8 bytes
big-endian), as float32 (for fp16 and int8 tables, the values of their stored rows); lookups are
pipelined `MGET`s and the ranker pools the raw rows. It implements
`LookupTransport`, so the same ranker serves from it and the comparison isolates the tier.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from flexemr.config.plan import ShardingPlan
from flexemr.extras import needs_extra
from flexemr.model import rows as stored_rows
from flexemr.model.weights import WeightSource, fill_stored
from flexemr.stats import counts
from flexemr.transport.base import LookupFailed, LookupRequest, ServerUnavailable

with needs_extra("redis"):
    import redis

_LOAD_CHUNK_ROWS = 8192
_MGET_CHUNK = 4096


def redis_keys(server: int, rows: np.ndarray) -> list[bytes]:
    return (rows.astype(np.uint64) | np.uint64(server << 48)).astype(">u8").view("V8").tolist()  # type: ignore[no-any-return]


class RedisTransport:
    def __init__(self, url: str, plan: ShardingPlan, threads: int = 4) -> None:
        self.url = url
        self.widths = [plan.server_width(s) for s in range(plan.num_servers)]
        """Columns of each server's rows (its widest shard's; narrower slices zero-filled)."""
        self.num_servers = plan.num_servers
        """The plan's servers, all answered by the one Redis."""
        self._client = redis.Redis.from_url(url)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="redis")
        self.requests = self.bytes_received = 0

    def load(self, plan: ShardingPlan, source: WeightSource) -> None:
        """Copy every shard's rows into Redis, as the plan lays them out on its servers."""
        for shard in plan.shards:
            for start in range(0, shard.rows, _LOAD_CHUNK_ROWS):
                n = min(_LOAD_CHUNK_ROWS, shard.rows - start)
                fmt = source.spec.formats[shard.table]
                dtype, width = stored_rows.storage(fmt, plan.dim)
                stored = np.empty((n, width), dtype=dtype)
                fill_stored(source, shard.table, shard.row_start + start, stored)
                first, last = shard.columns(plan.dim)
                rows = np.zeros((n, self.widths[shard.server]), dtype=np.float32)  # the shard's columns
                decoded = stored_rows.decode(torch.from_numpy(stored), fmt).numpy()
                rows[:, : last - first] = decoded[:, first:last]
                local = np.arange(shard.local_start + start, shard.local_start + start + n)
                values = rows.view(f"V{rows.shape[1] * 4}").ravel().tolist()
                self._client.mset(dict(zip(redis_keys(shard.server, local), values, strict=True)))

    def submit(self, server: int, request: LookupRequest) -> Future[np.ndarray]:
        if not request.raw:
            raise LookupFailed("the Redis tier returns raw rows only; serve it with --lookup raw")
        return self._pool.submit(self._mget, server, request.rows)

    def _mget(self, server: int, rows: np.ndarray) -> np.ndarray:
        keys = redis_keys(server, rows)
        try:
            pipe = self._client.pipeline(transaction=False)
            for i in range(0, len(keys), _MGET_CHUNK):
                pipe.mget(keys[i : i + _MGET_CHUNK])
            chunks = pipe.execute()
        except redis.RedisError as exc:
            raise ServerUnavailable(server, self.url, str(exc)) from exc
        values = [v for chunk in chunks for v in chunk]
        if any(v is None for v in values):
            raise LookupFailed(f"Redis holds no row for some keys of server {server}")
        self.requests += 1
        self.bytes_received += len(values) * self.widths[server] * 4
        return np.frombuffer(b"".join(values), dtype=np.float32).reshape(len(values), self.widths[server])

    def connected(self) -> list[bool]:
        """Per server of the plan, as the interface asks: the one Redis holds every server's rows."""
        try:
            up = bool(self._client.ping())
        except redis.RedisError:
            up = False
        return [up] * self.num_servers

    def stats(self) -> dict[str, Any]:
        return {"redis": counts({"requests": self.requests, "bytes_received": self.bytes_received})}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
