"""Factories for update tests: random row updates, and the monolithic model given the same rows
(`apply_monolithic`, the checker's)."""

from __future__ import annotations

import numpy as np

from flexemr.bench.update_checker import apply_monolithic as apply_monolithic  # one copy, shared
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
