from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flexemr.batch import InvalidRequest, SparseBatch
from flexemr.model.presets import preset
from flexemr.sharding.plan import make_plan
from flexemr.sharding.router import RangeRouter
from flexemr.workload import SyntheticConfig, SyntheticWorkload

SPEC = preset("tiny")


def _batch(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    per_table = lengths.reshape(SPEC.num_tables, -1).sum(axis=1)
    rng = np.random.default_rng(0)
    indices = np.concatenate([rng.integers(0, SPEC.table_rows[t], n) for t, n in enumerate(per_table)])
    return np.zeros((lengths.size // SPEC.num_tables, SPEC.num_dense), np.float32), indices, lengths


@pytest.mark.parametrize("table", range(SPEC.num_tables))
@pytest.mark.parametrize("value", ["too big", "negative"])
def test_out_of_range_index_names_its_table_even_next_to_empty_tables(table: int, value: str) -> None:
    lengths = np.array([[2, 1], [0, 0], [3, 0], [1, 1]], np.int32)[: SPEC.num_tables]
    lengths[table] = [1, 2]  # the table under test has indices; the others keep some empty
    dense, indices, lengths = _batch(lengths.ravel())
    SparseBatch(dense, indices, lengths).check(SPEC, 64, 100)  # valid as generated
    at = int(lengths.reshape(SPEC.num_tables, -1)[:table].sum()) + 1
    indices[at] = SPEC.table_rows[table] if value == "too big" else -1
    with pytest.raises(InvalidRequest, match=rf"sparse_indices\[{at}\] .* for table {table} "):
        SparseBatch(dense, indices, lengths).check(SPEC, 64, 100)


def test_int32_indices_are_accepted_as_sent_and_widened_into_keys() -> None:
    dense, indices, lengths = _batch(np.ones(SPEC.num_tables * 2, np.int32))
    batch = SparseBatch(dense, indices.astype(np.int32), lengths)
    batch.check(SPEC, 64, 100)
    assert batch.indices.dtype == np.int32  # no copy on the request path
    np.testing.assert_array_equal(batch.indices, indices)
    router = RangeRouter(make_plan("row", SPEC.table_rows, SPEC.dim, 2))
    keys = router.keys(batch.indices, batch.rows_per_table)
    assert keys.dtype == np.int64
    np.testing.assert_array_equal(keys, indices + np.repeat(router.table_base, batch.rows_per_table))


def _bags(request: SparseBatch) -> list[list[list[int]]]:
    """[table][sample] -> row ids, the slow obvious way."""
    ends = np.cumsum(request.lengths)
    flat = [request.indices[e - n : e].tolist() for e, n in zip(ends, request.lengths, strict=True)]
    b = request.batch_size
    return [flat[t * b : (t + 1) * b] for t in range(request.num_tables)]


def test_take_keeps_bags_with_their_samples() -> None:
    spec = preset("tiny")
    request = SyntheticWorkload(spec, SyntheticConfig(empty_prob=0.3), seed=3).generate(9)
    picked = [4, 0, 4, 8]
    taken = request.take(picked)
    assert np.array_equal(taken.dense, request.dense[picked])
    assert _bags(taken) == [[bags[i] for i in picked] for bags in _bags(request)]


def test_bad_layouts_are_refused() -> None:
    dense = np.zeros((2, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="lengths sum"):
        SparseBatch(dense, np.zeros(3, dtype=np.int64), np.ones(8, dtype=np.int32))
    with pytest.raises(ValueError, match="int64"):
        SparseBatch(dense, np.zeros(8, dtype=np.float64), np.ones(8, dtype=np.int32))
    with pytest.raises(ValueError, match="do not split into 2 samples"):
        SparseBatch(dense, np.zeros(7, dtype=np.int64), np.ones(7, dtype=np.int32))
    request = SparseBatch(dense, np.full(8, 500, dtype=np.int64), np.ones(8, dtype=np.int32))
    with pytest.raises(
        ValueError, match=r"sparse_indices\[0\] = 500 is out of range for table 0 \(valid rows 0..99\)"
    ):
        request.check(preset("tiny"))


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("rows", [100, 2**31 + 5])
def test_every_index_outside_its_tables_rows_is_refused_at_both_ends_of_its_dtype(
    dtype: type, rows: int
) -> None:
    """The range check reads indices as unsigned (one max per table): the most negative index of
    either dtype, -1, the table's row count and the dtype's largest value are refused, naming the
    index, even for a table with more rows than an int32 can address; 0 and the last row pass."""
    spec = dataclasses.replace(SPEC, table_rows=(rows, *SPEC.table_rows[1:]))
    dense, indices, lengths = _batch(np.ones(SPEC.num_tables * 2, np.int32))
    indices = indices.astype(dtype)
    info = np.iinfo(dtype)
    last_valid = min(rows - 1, info.max)
    for good in (0, last_valid):
        indices[1] = good
        SparseBatch(dense, indices, lengths).check(spec)
    for bad in sorted({info.min, -(2**31), -1, rows, info.max} - {last_valid}):
        if not info.min <= bad <= info.max:
            continue
        indices[1] = bad
        with pytest.raises(
            InvalidRequest, match=rf"sparse_indices\[1\] = {bad} is out of range for table 0 "
        ):
            SparseBatch(dense, indices, lengths).check(spec)
