"""Factories for update tests: random row updates, and the monolithic model given the same rows."""

from __future__ import annotations

import numpy as np

from flexemr.model import rows as stored_rows
from flexemr.model.dlrm import DLRM
from flexemr.model.spec import ModelSpec
from flexemr.updates import RowUpdates


def random_updates(spec: ModelSpec, n: int, seed: int, **kwargs: object) -> RowUpdates:
    """`n` distinct rows spread over every table, with fresh values."""
    rng = np.random.default_rng(seed)
    tables = np.arange(n, dtype=np.int64) % spec.num_tables
    rows = np.array([rng.integers(0, spec.table_rows[t]) for t in tables], dtype=np.int64)
    keep = np.unique(tables * 10**9 + rows, return_index=True)[1]
    values = rng.standard_normal((keep.size, spec.dim)).astype(np.float32)
    return RowUpdates(tables[keep], rows[keep], values, **kwargs)  # type: ignore[arg-type]


def rows_of(spec: ModelSpec, indices: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tables, rows) of every index of a KJT-layout batch, each pair once."""
    per_table = lengths.reshape(spec.num_tables, -1).sum(axis=1)
    tables = np.repeat(np.arange(spec.num_tables, dtype=np.int64), per_table)
    pairs = np.unique(np.stack([tables, indices.astype(np.int64)]), axis=1)
    return pairs[0], pairs[1]


def apply_monolithic(model: DLRM, updates: RowUpdates) -> None:
    """Write `updates` into the monolithic model's tables, encoded in each table's row format."""
    for t, bag in enumerate(model.emb_l):
        mine = updates.tables == t
        if not mine.any():
            continue
        weight = bag.weight.detach().numpy()
        encoded = np.empty((int(mine.sum()), weight.shape[1]), dtype=weight.dtype)
        stored_rows.encode(updates.values[mine], model.spec.formats[t], encoded)
        weight[updates.rows[mine]] = encoded
