from __future__ import annotations

import numpy as np
import pytest

from flexemr.model.presets import preset
from flexemr.ranker.batch import InvalidRequest, validate_batch
from flexemr.sharding.plan import make_plan
from flexemr.sharding.router import RangeRouter

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
    validate_batch(SPEC, dense, indices, lengths, 64, 100)  # valid as generated
    at = int(lengths.reshape(SPEC.num_tables, -1)[:table].sum()) + 1
    indices[at] = SPEC.table_rows[table] if value == "too big" else -1
    with pytest.raises(InvalidRequest, match=rf"sparse_indices\[{at}\] .* for table {table} "):
        validate_batch(SPEC, dense, indices, lengths, 64, 100)


def test_int32_indices_are_accepted_as_sent_and_widened_into_keys() -> None:
    dense, indices, lengths = _batch(np.ones(SPEC.num_tables * 2, np.int32))
    batch = validate_batch(SPEC, dense, indices.astype(np.int32), lengths, 64, 100)
    assert batch.indices.dtype == np.int32  # no copy on the request path
    np.testing.assert_array_equal(batch.indices, indices)
    router = RangeRouter(make_plan("row", SPEC.table_rows, SPEC.dim, 2))
    keys = router.keys(batch.indices, batch.rows_per_table())
    assert keys.dtype == np.int64
    np.testing.assert_array_equal(keys, indices + np.repeat(router.table_base, batch.rows_per_table()))
