"""One batch of DLRM samples in TorchRec's KeyedJaggedTensor layout: what clients send, the
workloads generate and the ranker scores.

```
dense    float32        [B, num_dense]
indices  int64 or int32 [N]        table 0's bags (sample 0, 1, ..., B-1), then table 1's, ...
lengths  int32          [T * B]    table-major: lengths[t * B + b] = bag size of table t, sample b
offsets  int64          [T * B + 1] bag t * B + b is indices[offsets[t * B + b] : offsets[t * B + b + 1]]

       sample:   0    1    2   |  0    1    2
lengths       = [2,   0,   1,  |  1,   3,   0 ]      (T=2, B=3)
indices       = [a a       b   |  c    d d d    ]
offsets       = [0,   2,   2,  3,   4,   7,   7]
```

Construction checks the layout (dtypes, shapes, lengths against indices); `check` checks the batch
against a model and the serving limits. Both raise `InvalidRequest` naming the first bad field and
value, so a caller can fix the request. Offsets are computed once, on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from flexemr.model.spec import ModelSpec


class InvalidRequest(ValueError):
    """The caller sent something wrong; the message says what and where."""


def _expect(name: str, array: np.ndarray, dtypes: tuple[type, ...], ndim: int) -> None:
    if not isinstance(array, np.ndarray) or array.dtype not in dtypes:
        got = getattr(array, "dtype", type(array).__name__)
        raise InvalidRequest(f"{name} must be {' or '.join(np.dtype(d).name for d in dtypes)}, got {got}")
    if array.ndim != ndim:
        raise InvalidRequest(f"{name} must have {ndim} dimension(s), got shape {list(array.shape)}")


@dataclass(frozen=True)
class SparseBatch:
    dense: np.ndarray
    """float32 [B, num_dense]."""
    indices: np.ndarray
    """int64 or int32 (as sent: int32 halves the request bytes) [N], table-major."""
    lengths: np.ndarray
    """int32 [T*B]: lengths[t*B + b] is the bag size of table t for sample b."""

    def __post_init__(self) -> None:
        _expect("dense_features", self.dense, (np.float32,), 2)
        _expect("sparse_indices", self.indices, (np.int64, np.int32), 1)
        _expect("sparse_lengths", self.lengths, (np.int32,), 1)
        batch, lengths = self.batch_size, self.lengths
        if batch == 0:
            raise InvalidRequest("dense_features has batch size 0; send at least one sample")
        if lengths.size % batch:
            raise InvalidRequest(
                f"sparse_lengths must have one entry per table and sample: {lengths.size} entries "
                f"do not split into {batch} samples"
            )
        if lengths.size and lengths.min() < 0:
            at = int(np.argmax(lengths < 0))
            raise InvalidRequest(f"sparse_lengths[{at}] = {lengths[at]} is negative")
        if int(self.offsets[-1]) != self.indices.size:
            raise InvalidRequest(
                f"sparse_lengths sum to {int(self.offsets[-1])} but sparse_indices has "
                f"{self.indices.size} entries"
            )

    @property
    def batch_size(self) -> int:
        return int(self.dense.shape[0])

    @property
    def num_tables(self) -> int:
        return self.lengths.size // self.batch_size

    @cached_property
    def offsets(self) -> np.ndarray:
        """int64 [T*B + 1]: where each bag starts in `indices`, and N last."""
        offsets = np.zeros(self.lengths.size + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        return offsets

    @cached_property
    def rows_per_table(self) -> np.ndarray:
        """int64 [T]: how many indices each table contributes."""
        table_ends = self.offsets[:: self.batch_size]
        counts: np.ndarray = np.diff(table_ends)
        return counts

    def table_lengths(self) -> np.ndarray:
        """Bag sizes as [T, B] (a view)."""
        return self.lengths.reshape(self.num_tables, self.batch_size)

    def table_indices(self, table: int) -> np.ndarray:
        """All row ids that `table`'s bags hold, samples in order (a view)."""
        b = self.batch_size
        return self.indices[self.offsets[table * b] : self.offsets[(table + 1) * b]]

    def check(self, spec: ModelSpec, max_batch: int | None = None, max_per_sample: int | None = None) -> None:
        """Raise `InvalidRequest` unless the batch fits `spec` (dense width, tables, row ranges)
        and the limits: at most `max_batch` samples, `max_per_sample` indices per sample on
        average (None: no limit)."""
        batch, num_dense = self.dense.shape
        if max_batch is not None and batch > max_batch:
            raise InvalidRequest(f"batch size {batch} exceeds the maximum of {max_batch}; split the request")
        if num_dense != spec.num_dense:
            raise InvalidRequest(f"dense_features must have {spec.num_dense} columns, got {num_dense}")
        if not np.isfinite(self.dense).all():
            row, col = np.argwhere(~np.isfinite(self.dense))[0]
            raise InvalidRequest(f"dense_features[{row}, {col}] = {self.dense[row, col]} is not finite")
        tables = spec.num_tables
        if self.num_tables != tables:
            raise InvalidRequest(
                f"sparse_lengths must have {tables} tables x {batch} samples = {tables * batch} entries, "
                f"got {self.lengths.size}"
            )
        total, indices = self.indices.size, self.indices
        if max_per_sample is not None and total > max_per_sample * batch:
            raise InvalidRequest(
                f"{total} indices exceed the limit of {max_per_sample} per sample on average"
            )
        per_table = self.rows_per_table
        table_rows = np.asarray(spec.table_rows, dtype=np.int64)
        # Each table's indices are one segment: its largest, read as unsigned, is below the table's
        # rows iff all are in range (one pass): a negative index reads as 2**63 or more (int64; 2**31
        # for int32, past which no int32 index is valid whatever the table's rows).
        used = np.flatnonzero(per_table)
        starts = self.offsets[:-1:batch][used]
        sign_bit = np.uint64(1) << np.uint64(8 * indices.itemsize - 1)
        bounds = np.minimum(table_rows[used].astype(np.uint64), sign_bit)
        unsigned = indices.view(np.uint64 if indices.itemsize == 8 else np.uint32)
        if used.size and np.any(np.maximum.reduceat(unsigned, starts) >= bounds):
            bad = (indices < 0) | (indices >= np.repeat(table_rows, per_table))
            at = int(np.argmax(bad))
            table = int(np.searchsorted(np.cumsum(per_table), at, side="right"))
            raise InvalidRequest(
                f"sparse_indices[{at}] = {indices[at]} is out of range for table {table} "
                f"(valid rows 0..{spec.table_rows[table] - 1})"
            )

    def take(self, samples: np.ndarray | Sequence[int]) -> SparseBatch:
        """The samples at positions `samples` (any order, repeats allowed), as a new batch."""
        picked = np.asarray(samples, dtype=np.int64)
        starts = self.offsets[:-1].reshape(self.num_tables, -1)[:, picked]
        return _gather(self.dense[picked], self.indices, starts, self.table_lengths()[:, picked])

    def slice(self, start: int, stop: int) -> SparseBatch:
        """Samples `start:stop`."""
        return self.take(np.arange(start, min(stop, self.batch_size)))


def _gather(dense: np.ndarray, indices: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> SparseBatch:
    """The batch whose bag (t, b) is `indices[starts[t, b] : starts[t, b] + lengths[t, b]]`."""
    starts, lengths = starts.ravel(), lengths.ravel()
    total = int(lengths.sum(dtype=np.int64))
    # Output position i of a bag comes from its start + (i - the bag's first output position).
    shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return SparseBatch(dense, indices[shift + np.arange(total, dtype=np.int64)], lengths.astype(np.int32))
