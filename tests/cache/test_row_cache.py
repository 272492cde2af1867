from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexemr.cache import row_cache
from flexemr.cache.row_cache import RowCache

DIM = 4


def source(keys: torch.Tensor) -> torch.Tensor:
    """A deterministic 'table': row of key k is k, k+0.25, ..."""
    return keys.to(torch.float32).unsqueeze(1) + torch.arange(DIM) / 4


def cache_of(rows: int, ways: int = 16) -> RowCache:
    return RowCache(DIM, rows * (4 * DIM + 16), "cpu", ways)


def keys(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def test_hits_return_the_inserted_rows_and_misses_do_not() -> None:
    cache = cache_of(64)
    cache.insert(keys(1, 2, 3), source(keys(1, 2, 3)))
    hit, slots = cache.lookup(keys(1, 4, 3, 0))
    assert hit.tolist() == [True, False, True, False]
    torch.testing.assert_close(cache.gather(slots[hit]), source(keys(1, 3)))
    assert cache.num_rows == 3
    assert cache.size_bytes == 3 * cache.slot_bytes
    assert cache.capacity_rows == 64


def test_capacity_zero_misses_everything() -> None:
    cache = RowCache(DIM, 0)
    assert cache.insert(keys(1, 2), source(keys(1, 2))) == 0
    assert not cache.lookup(keys(1, 2))[0].any()
    assert cache.num_rows == cache.capacity_bytes == 0
    cache.resize(0)
    cache.resize(10 * cache.slot_bytes)
    cache.insert(keys(5), source(keys(5)))
    assert cache.contains(keys(5)).all()


def test_capacity_below_one_row_is_zero_rows() -> None:
    cache = RowCache(DIM, 4 * DIM + 15)
    assert cache.capacity_rows == 0


def test_full_set_evicts_the_least_recently_used() -> None:
    cache = cache_of(4, ways=4)  # one set of 4: exact LRU
    cache.insert(keys(1, 2, 3, 4), source(keys(1, 2, 3, 4)))
    cache.lookup(keys(1))
    cache.insert(keys(5), source(keys(5)))
    assert cache.contains(keys(1, 2, 3, 4, 5)).tolist() == [True, False, True, True, True]
    cache.lookup(keys(3, 4))  # order now (old -> new): 1 5 3 4
    cache.insert(keys(6, 7), source(keys(6, 7)))
    assert cache.contains(keys(1, 3, 4, 5, 6, 7)).tolist() == [False, True, True, False, True, True]


def test_later_positions_in_a_lookup_count_as_more_recent() -> None:
    cache = cache_of(3, ways=3)
    cache.insert(keys(1, 2, 3), source(keys(1, 2, 3)))
    cache.lookup(keys(3, 1, 2))
    cache.insert(keys(9), source(keys(9)))
    assert cache.contains(keys(1, 2, 3)).tolist() == [True, True, False]


def test_duplicates_in_a_batch() -> None:
    cache = cache_of(8)
    rows = source(keys(7, 7, 8))
    rows[1] = -1.0  # a second copy of 7: the first one wins
    assert cache.insert(keys(7, 7, 8), rows) == 2
    assert cache.num_rows == 2
    hit, slots = cache.lookup(keys(8, 7, 7, 8, 7))
    assert hit.all()
    torch.testing.assert_close(cache.gather(slots), source(keys(8, 7, 7, 8, 7)))


def test_more_new_keys_than_capacity_in_one_batch() -> None:
    cache = cache_of(32, ways=8)
    new = torch.arange(1000)
    cache.insert(new, source(new))
    assert 0 < cache.num_rows <= 32
    hit, slots = cache.lookup(new)
    assert int(hit.sum()) == cache.num_rows
    torch.testing.assert_close(cache.gather(slots[hit]), source(new[hit]))


def test_shrink_keeps_the_most_recent_exactly_when_fully_associative() -> None:
    cache = cache_of(8, ways=8)
    cache.insert(torch.arange(8), source(torch.arange(8)))
    cache.lookup(keys(5, 0, 7, 2, 6, 1, 4, 3))  # newest last
    evicted = cache.resize(4 * cache.slot_bytes)
    assert evicted == 4
    assert cache.contains(torch.arange(8)).nonzero().squeeze(1).tolist() == [1, 3, 4, 6]
    cache.insert(keys(9), source(keys(9)))  # recency survived the resize: 6 was the oldest kept
    assert cache.contains(keys(1, 3, 4, 6, 9)).tolist() == [True, True, True, False, True]


def recently_used(cache: RowCache) -> torch.Tensor:
    """Fill a cache with random keys, use them in a random order; the keys held, newest last."""
    all_keys = torch.randperm(4096, generator=torch.Generator().manual_seed(0))[: cache.capacity_rows]
    cache.insert(all_keys, source(all_keys))
    order = all_keys[torch.randperm(all_keys.numel(), generator=torch.Generator().manual_seed(1))]
    cache.lookup(order[cache.contains(order)])
    return order[cache.contains(order)]


def test_shrink_keeps_each_sets_most_recent_rows() -> None:
    cache = cache_of(512, ways=8)
    held = recently_used(cache)
    sets = cache._sets(held)
    assert cache.resize(128 * cache.slot_bytes) == held.numel() - cache.num_rows
    assert (cache.num_sets, cache.ways) == (64, 2)  # same sets, fewer ways: no rehashing
    kept = cache.contains(held)
    for s in range(64):
        in_set = kept[sets == s]
        newest = min(2, in_set.numel())
        assert in_set.tolist() == [False] * (in_set.numel() - newest) + [True] * newest
    hit, slots = cache.lookup(held)
    torch.testing.assert_close(cache.gather(slots[hit]), source(held[hit]))


def test_shrink_below_one_way_keeps_the_globally_most_recent_rows() -> None:
    cache = cache_of(512, ways=8)
    held = recently_used(cache)
    cache.resize(32 * cache.slot_bytes)  # fewer slots than sets: a rebuild with 4 sets of 8
    assert (cache.num_sets, cache.ways) == (4, 8)
    assert 16 <= cache.num_rows <= 32
    assert cache.contains(held)[: held.numel() - 32].sum() == 0  # nothing older than the newest 32


def test_grow_adds_ways_and_keeps_every_row() -> None:
    cache = cache_of(64, ways=8)
    cache.resize(16 * cache.slot_bytes)  # 8 sets of 2
    held = recently_used(cache)
    assert cache.resize(64 * cache.slot_bytes) == 0
    assert (cache.num_sets, cache.ways) == (8, 8)
    assert cache.contains(held).all()
    cache.insert(torch.arange(5000, 5100), source(torch.arange(5000, 5100)))  # the new ways fill
    assert cache.num_rows > held.numel()


def test_grow_keeps_every_row() -> None:
    cache = cache_of(64, ways=4)
    new = torch.arange(0, 640, 10)
    cache.insert(new, source(new))
    before = new[cache.contains(new)]
    assert cache.resize(1024 * cache.slot_bytes) == 0
    assert cache.capacity_rows == 1024
    hit, slots = cache.lookup(before)
    assert hit.all()
    torch.testing.assert_close(cache.gather(slots), source(before))


def test_invalidate_then_reinsert_serves_the_new_value() -> None:
    cache = cache_of(16)
    cache.insert(keys(3, 4), source(keys(3, 4)))
    assert cache.invalidate(keys(3, 3, 99)) == 1
    assert cache.contains(keys(3, 4)).tolist() == [False, True]
    cache.insert(keys(3), torch.full((1, DIM), 42.0))
    hit, slots = cache.lookup(keys(3))
    assert hit.all()
    assert (cache.gather(slots) == 42.0).all()
    cache.clear()
    assert cache.num_rows == 0


ops = st.lists(
    st.tuples(
        st.sampled_from(["insert", "lookup", "invalidate", "resize"]),
        st.lists(st.integers(0, 60), max_size=40),
        st.integers(0, 48),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(ops=ops, ways=st.sampled_from([1, 2, 4, 16]))
def test_random_operations_never_serve_a_wrong_or_invalidated_row(
    ops: list[tuple[str, list[int], int]], ways: int
) -> None:
    cache = cache_of(16, ways)
    version = torch.zeros(61)  # the source changes value on invalidation
    for op, values, size in ops:
        batch = torch.tensor(values, dtype=torch.int64)
        if op == "insert":
            cache.insert(batch, source(batch) + version[batch].unsqueeze(1))
        elif op == "invalidate":
            version[batch] += 1000
            cache.invalidate(batch)
            assert not cache.contains(batch).any()
        elif op == "resize":
            cache.resize(size * cache.slot_bytes)
        hit, slots = cache.lookup(batch)
        expected = source(batch) + version[batch].unsqueeze(1)
        torch.testing.assert_close(cache.gather(slots[hit]), expected[hit])
        assert cache.num_rows <= cache.capacity_rows
        assert cache.capacity_bytes <= max(cache.slot_bytes * 48, cache.slot_bytes * 16)


def test_lookups_across_many_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = cache_of(64, ways=8)
    held = torch.arange(0, 400, 7)
    cache.insert(held, source(held))
    probe = torch.randint(0, 400, (1000,), generator=torch.Generator().manual_seed(0))
    expected = cache.contains(probe)
    monkeypatch.setattr(row_cache, "FIND_CHUNK", 7)
    hit, slots = cache.lookup(probe)
    assert torch.equal(hit, expected) and hit.any()
    torch.testing.assert_close(cache.gather(slots[hit]), source(probe[hit]))
    assert (cache.gather(slots[~hit]) == 0).all()  # misses read the zero row


@settings(max_examples=60, deadline=None)
@given(start=st.integers(0, 300), target=st.integers(0, 300), ways=st.sampled_from([1, 2, 4, 8]))
def test_capacity_after_resize_is_what_resize_gives(start: int, target: int, ways: int) -> None:
    cache = cache_of(start, ways)
    predicted = cache.capacity_after_resize(target * cache.slot_bytes)
    cache.resize(target * cache.slot_bytes)
    assert cache.capacity_bytes == predicted <= target * cache.slot_bytes


def test_a_resize_within_one_way_changes_nothing() -> None:
    cache = cache_of(64, ways=4)  # 16 sets of 4
    held = recently_used(cache)
    rows = cache._rows
    assert cache.resize(cache.capacity_bytes + 15 * cache.slot_bytes) == 0
    assert cache._rows is rows, "no reallocation, no copy"
    assert cache.contains(held).all()
