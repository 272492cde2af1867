"""One batch of DLRM samples in the KeyedJaggedTensor layout the ranker and the HTTP API take.

```
dense    float32 [B, num_dense]
indices  int64   [N]      table 0's bags (sample 0, 1, ..., B-1), then table 1's, ...
lengths  int32   [T * B]  table-major: lengths[t * B + b] = bag size of table t, sample b

       sample:   0    1    2   |  0    1    2
lengths       = [2,   0,   1,  |  1,   3,   0 ]      (T=2, B=3)
indices       = [a a       b   |  c    d d d    ]
```
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flexemr.model.spec import ModelSpec


@dataclass(frozen=True)
class Request:
    """A batch of samples: dense features plus one bag of row ids per (table, sample)."""

    dense: np.ndarray
    """float32 [batch_size, num_dense]."""
    indices: np.ndarray
    """int64 [N]: every bag's row ids, table-major, samples in order within a table."""
    lengths: np.ndarray
    """int32 [num_tables * batch_size]: bag sizes, table-major."""

    def __post_init__(self) -> None:
        if self.dense.ndim != 2 or self.dense.dtype != np.float32:
            raise ValueError(
                f"dense must be float32 [B, num_dense], got {self.dense.dtype} {self.dense.shape}"
            )
        if self.indices.ndim != 1 or self.indices.dtype != np.int64:
            raise ValueError(f"indices must be int64 [N], got {self.indices.dtype} {self.indices.shape}")
        if self.lengths.ndim != 1 or self.lengths.dtype != np.int32:
            raise ValueError(f"lengths must be int32 [T*B], got {self.lengths.dtype} {self.lengths.shape}")
        batch = self.dense.shape[0]
        if batch == 0 or len(self.lengths) % batch:
            raise ValueError(f"{len(self.lengths)} lengths do not split into batch_size={batch} samples")
        if self.lengths.size and self.lengths.min() < 0:
            raise ValueError("lengths must be non-negative")
        if int(self.lengths.sum()) != len(self.indices):
            raise ValueError(
                f"lengths sum to {int(self.lengths.sum())} but there are {len(self.indices)} indices"
            )

    @property
    def batch_size(self) -> int:
        return int(self.dense.shape[0])

    @property
    def num_tables(self) -> int:
        return len(self.lengths) // self.batch_size

    def table_lengths(self) -> np.ndarray:
        """Bag sizes as [num_tables, batch_size]."""
        return self.lengths.reshape(self.num_tables, self.batch_size)

    def table_indices(self, table: int) -> np.ndarray:
        """All row ids that `table`'s bags hold, samples in order (a view)."""
        ends = np.cumsum(self.table_lengths().sum(axis=1))
        start = int(ends[table - 1]) if table else 0
        return self.indices[start : int(ends[table])]

    def check(self, spec: ModelSpec) -> None:
        """Raise ValueError unless this request fits `spec`'s tables and dense width."""
        if self.dense.shape[1] != spec.num_dense or self.num_tables != spec.num_tables:
            raise ValueError(
                f"request has {self.dense.shape[1]} dense features and {self.num_tables} tables; "
                f"the model wants {spec.num_dense} and {spec.num_tables}"
            )
        for t, rows in enumerate(spec.table_rows):
            ids = self.table_indices(t)
            if ids.size and (ids.min() < 0 or ids.max() >= rows):
                raise ValueError(
                    f"table {t} has {rows} rows but the request holds ids {ids.min()}..{ids.max()}"
                )

    def take(self, samples: np.ndarray | Sequence[int]) -> Request:
        """The samples at positions `samples` (any order, repeats allowed), as a new request."""
        picked = np.asarray(samples, dtype=np.int64)
        lengths = self.table_lengths()
        starts = (np.cumsum(self.lengths) - self.lengths).reshape(lengths.shape)
        new_lengths = lengths[:, picked].ravel()
        new_starts = starts[:, picked].ravel()
        total = int(new_lengths.sum())
        # Position i of the output comes from new_starts[bag] + (i - first output position of bag).
        shift = np.repeat(new_starts - (np.cumsum(new_lengths) - new_lengths), new_lengths)
        return Request(
            dense=self.dense[picked],
            indices=self.indices[shift + np.arange(total, dtype=np.int64)],
            lengths=new_lengths.astype(np.int32),
        )

    def slice(self, start: int, stop: int) -> Request:
        """Samples `start:stop`."""
        return self.take(np.arange(start, min(stop, self.batch_size)))

    @staticmethod
    def concat(requests: Sequence[Request]) -> Request:
        """The samples of every request, in order, as one request (all must have the same tables)."""
        if not requests:
            raise ValueError("concat needs at least one request")
        tables = {r.num_tables for r in requests}
        if len(tables) != 1:
            raise ValueError(f"cannot concat requests with different table counts {sorted(tables)}")
        per_table = [(r.table_lengths(), np.cumsum(r.table_lengths().sum(axis=1))) for r in requests]
        lengths = np.concatenate([lens for lens, _ in per_table], axis=1)
        chunks = []
        for t in range(tables.pop()):
            for r, (_, ends) in zip(requests, per_table, strict=True):
                chunks.append(r.indices[(int(ends[t - 1]) if t else 0) : int(ends[t])])
        return Request(
            dense=np.concatenate([r.dense for r in requests]),
            indices=np.concatenate(chunks),
            lengths=lengths.ravel().astype(np.int32),
        )
