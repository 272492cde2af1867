"""An embedding server's rows: all its shards back to back in one array, and the lookup kernels.

The array lives in an anonymous mapping advised for transparent huge pages: random row reads over
gigabytes miss the TLB far less with 2 MiB pages. Lookups use torch's fused `embedding_bag`
(offsets form), which pools a whole subrequest in one call and releases the GIL while it runs.
"""

from __future__ import annotations

import logging
import mmap

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from flexemr.model.weights import WeightSource
from flexemr.sharding.plan import ShardingPlan

log = logging.getLogger(__name__)

_LOAD_CHUNK_ROWS = 1 << 18


class BadSubrequest(ValueError):
    """A subrequest this server cannot answer (bad rows or offsets); sent back as an ERROR frame."""


def _huge_page_array(rows: int, dim: int) -> np.ndarray:
    nbytes = max(rows * dim * 4, 1)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buffer.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # THP disabled on this kernel: plain pages still work.
            log.info("transparent huge pages unavailable; using normal pages")
    return np.frombuffer(buffer, dtype=np.float32, count=rows * dim).reshape(rows, dim)


class ShardStore:
    def __init__(self, plan: ShardingPlan, server: int, source: WeightSource, progress: bool = True) -> None:
        self.server = server
        self.dim = plan.dim
        self.num_rows = plan.server_rows(server)
        self.shards = plan.shards_of(server)
        self._array = _huge_page_array(self.num_rows, self.dim)
        total = sum(s.rows for s in self.shards)
        with tqdm(
            total=total, unit="rows", unit_scale=True, disable=not progress, desc=f"server {server} loading"
        ) as bar:
            for shard in self.shards:
                for start in range(0, shard.rows, _LOAD_CHUNK_ROWS):
                    n = min(_LOAD_CHUNK_ROWS, shard.rows - start)
                    local = shard.local_start + start
                    source.fill_rows(shard.table, shard.row_start + start, self._array[local : local + n])
                    bar.update(n)
        self.table = torch.from_numpy(self._array)

    @property
    def nbytes(self) -> int:
        return self.num_rows * self.dim * 4

    def _check(self, rows: np.ndarray, offsets: np.ndarray | None, weights: np.ndarray | None) -> None:
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            bad = rows[(rows < 0) | (rows >= self.num_rows)][0]
            raise BadSubrequest(f"row {bad} is outside this server's {self.num_rows} rows")
        if offsets is not None and offsets.size:
            if offsets[0] != 0 or offsets[-1] > rows.size or np.any(np.diff(offsets) < 0):
                raise BadSubrequest("bag offsets must start at 0, not decrease, and stay within the rows")
        if weights is not None and weights.shape != rows.shape:
            raise BadSubrequest(f"{weights.size} weights for {rows.size} rows")

    def pooled(self, rows: np.ndarray, offsets: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Per-bag sums of this server's rows: [len(offsets), dim]."""
        self._check(rows, offsets, weights)
        if offsets.size == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = F.embedding_bag(
            torch.from_numpy(rows),
            self.table,
            torch.from_numpy(offsets),
            mode="sum",
            per_sample_weights=None if weights is None else torch.from_numpy(weights),
        )
        return out.numpy()

    def raw(self, rows: np.ndarray) -> np.ndarray:
        """The rows themselves: [len(rows), dim]."""
        self._check(rows, None, None)
        return self.table.index_select(0, torch.from_numpy(rows)).numpy()
