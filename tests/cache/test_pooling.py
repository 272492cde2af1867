"""The cache's per-bag sums plus the misses pooled elsewhere equal torch's embedding_bag."""

from __future__ import annotations

import pytest
import torch

from flexemr.cache.pooling import cached_partial_sums
from flexemr.cache.row_cache import RowCache
from tests.cache.helpers import make_batch, make_tables, pool_with_cache, reference_pool, rows_of

TABLE_ROWS = (300, 50, 1000, 7)
DIM = 8


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("cache_rows", [0, 1, 40, 5000])
def test_cached_sums_plus_misses_equal_the_reference(mode: str, cache_rows: int) -> None:
    tables = make_tables(TABLE_ROWS, DIM)
    gen = torch.Generator().manual_seed(cache_rows)
    cache = RowCache(DIM, cache_rows * (4 * DIM + 16), ways=8)
    total_hits = 0
    for _ in range(6):
        batch = make_batch(TABLE_ROWS, batch_size=16, max_bag=6, gen=gen)
        part = cached_partial_sums(cache, batch.keys, batch.offsets)
        total_hits += part.hits
        pooled = pool_with_cache(part.sums, part.hit, tables, batch, mode)
        torch.testing.assert_close(pooled, reference_pool(tables, batch, mode))
        # the ranker admits the misses it got raw
        cache.insert(batch.keys[part.miss], rows_of(tables, batch.keys[part.miss]))
    if cache_rows >= 40:
        assert total_hits > 0  # the comparison did exercise cached rows


def test_sums_accumulate_into_a_given_buffer() -> None:
    tables = make_tables(TABLE_ROWS, DIM)
    batch = make_batch(TABLE_ROWS, batch_size=4, max_bag=3, gen=torch.Generator().manual_seed(1))
    cache = RowCache(DIM, 10_000 * (4 * DIM + 16))
    cache.insert(batch.keys, rows_of(tables, batch.keys))
    out = torch.ones(len(TABLE_ROWS) * 4, DIM)
    part = cached_partial_sums(cache, batch.keys, batch.offsets, out=out)
    assert part.sums is out
    assert part.hit.all()
    torch.testing.assert_close(out - 1, reference_pool(tables, batch, "sum"))


def test_offsets_must_cover_the_keys_in_order() -> None:
    cache = RowCache(DIM, 1024)
    keys = torch.zeros(3, dtype=torch.int64)
    for offsets in ([0, 2], [0, 2, 1, 3], [1, 2, 3], [0, 1, 4], [[0, 3]]):
        with pytest.raises(ValueError, match="non-decreasing from 0 to 3"):
            cached_partial_sums(cache, keys, torch.tensor(offsets))


def test_out_of_the_wrong_shape_is_refused() -> None:
    cache = RowCache(DIM, 1024)
    with pytest.raises(ValueError, match="out must be"):
        cached_partial_sums(
            cache, torch.zeros(3, dtype=torch.int64), torch.tensor([0, 3]), torch.zeros(2, DIM)
        )


def test_miss_lengths_count_each_bags_misses() -> None:
    cache = RowCache(DIM, 1024)
    cache.insert(torch.tensor([1, 2, 4]), torch.ones(3, DIM))
    keys = torch.tensor([1, 2, 3, 4, 5])
    part = cached_partial_sums(cache, keys, torch.tensor([0, 2, 3, 3, 5]))  # bags: 1 2 | 3 | - | 4 5
    assert part.miss_lengths.tolist() == [0, 1, 0, 1]
