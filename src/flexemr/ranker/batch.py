"""A validated request batch in TorchRec's KeyedJaggedTensor layout.

    indices: [ t0 s0 | t0 s1 | ... | t0 sB-1 | t1 s0 | ... ]   (int64, N)
    lengths: [ len(t0,s0) ... len(t0,sB-1) len(t1,s0) ... ]      (int32, T*B, table-major)

Bag `t * B + b` holds table t's rows for sample b. Validation runs on whole arrays and names the
first bad field and value, so a caller can fix the request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flexemr.model.spec import ModelSpec


class InvalidRequest(ValueError):
    """The caller sent something wrong; the message says what and where."""


@dataclass(frozen=True)
class SparseBatch:
    dense: np.ndarray
    """float32 [B, num_dense]."""
    indices: np.ndarray
    """int64 or int32 (as sent) [N], table-major, each table's bags in sample order."""
    lengths: np.ndarray
    """int32 [T*B]: lengths[t*B + b] is the bag size of table t for sample b."""
    num_tables: int

    @property
    def batch_size(self) -> int:
        return int(self.dense.shape[0])

    def rows_per_table(self) -> np.ndarray:
        """How many indices each table contributes: int64 [T]."""
        counts: np.ndarray = self.lengths.reshape(self.num_tables, -1).sum(axis=1, dtype=np.int64)
        return counts


def _expect(name: str, array: np.ndarray, dtypes: tuple[type, ...], ndim: int) -> None:
    if not isinstance(array, np.ndarray) or array.dtype not in dtypes:
        got = getattr(array, "dtype", type(array).__name__)
        raise InvalidRequest(f"{name} must be {' or '.join(np.dtype(d).name for d in dtypes)}, got {got}")
    if array.ndim != ndim:
        raise InvalidRequest(f"{name} must have {ndim} dimension(s), got shape {list(array.shape)}")


def validate_batch(
    spec: ModelSpec,
    dense: np.ndarray,
    indices: np.ndarray,
    lengths: np.ndarray,
    max_batch: int,
    max_indices_per_sample: int,
) -> SparseBatch:
    _expect("dense_features", dense, (np.float32,), 2)
    _expect("sparse_indices", indices, (np.int64, np.int32), 1)  # int32 halves the request bytes
    _expect("sparse_lengths", lengths, (np.int32,), 1)
    batch, num_dense = dense.shape
    if batch == 0:
        raise InvalidRequest("dense_features has batch size 0; send at least one sample")
    if batch > max_batch:
        raise InvalidRequest(f"batch size {batch} exceeds the maximum of {max_batch}; split the request")
    if num_dense != spec.num_dense:
        raise InvalidRequest(f"dense_features must have {spec.num_dense} columns, got {num_dense}")
    if not np.isfinite(dense).all():
        row, col = np.argwhere(~np.isfinite(dense))[0]
        raise InvalidRequest(f"dense_features[{row}, {col}] = {dense[row, col]} is not finite")
    tables = spec.num_tables
    if lengths.size != tables * batch:
        raise InvalidRequest(
            f"sparse_lengths must have {tables} tables x {batch} samples = {tables * batch} entries, "
            f"got {lengths.size}"
        )
    if lengths.size and lengths.min() < 0:
        at = int(np.argmax(lengths < 0))
        raise InvalidRequest(f"sparse_lengths[{at}] = {lengths[at]} is negative")
    total = int(lengths.sum(dtype=np.int64))
    if total != indices.size:
        raise InvalidRequest(f"sparse_lengths sum to {total} but sparse_indices has {indices.size} entries")
    if total > max_indices_per_sample * batch:
        raise InvalidRequest(
            f"{total} indices exceed the limit of {max_indices_per_sample} per sample on average"
        )
    per_table = lengths.reshape(tables, batch).sum(axis=1, dtype=np.int64)
    table_rows = np.asarray(spec.table_rows, dtype=np.int64)
    # Each table's indices are one segment: check its min and max (two passes, no per-index limit).
    used = np.flatnonzero(per_table)
    starts = (np.cumsum(per_table) - per_table)[used]
    if used.size and (
        np.minimum.reduceat(indices, starts).min() < 0
        or np.any(np.maximum.reduceat(indices, starts) >= table_rows[used])
    ):
        bad = (indices < 0) | (indices >= np.repeat(table_rows, per_table))
        at = int(np.argmax(bad))
        table = int(np.searchsorted(np.cumsum(per_table), at, side="right"))
        raise InvalidRequest(
            f"sparse_indices[{at}] = {indices[at]} is out of range for table {table} "
            f"(valid rows 0..{spec.table_rows[table] - 1})"
        )
    return SparseBatch(dense, indices, lengths, tables)
