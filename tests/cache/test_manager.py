from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from flexemr.cache.manager import AdaptiveCacheManager
from flexemr.cache.memory_model import MemoryModel
from flexemr.config import CacheMode, format_bytes, parse_bytes
from flexemr.config.cache import CacheConfig, LoadMonitorConfig
from flexemr.model.dlrm import DenseArch
from flexemr.model.presets import preset
from tests.cache.helpers import make_batch, make_tables, pool_with_cache, reference_pool, rows_of

TABLE_ROWS = (400, 60, 900)
DIM = 8
SLOT = 4 * DIM + 16


ADAPTIVE = CacheMode("adaptive")


def test_parse_modes_and_sizes() -> None:
    assert CacheMode.parse("off") == CacheMode("off")
    assert CacheMode.parse("adaptive") == CacheMode("adaptive")
    assert CacheMode.parse("fixed:64MiB") == CacheMode("fixed", 64 << 20)
    assert CacheMode.parse("fixed:1.5GB") == CacheMode("fixed", 1_500_000_000)
    assert str(CacheMode.parse("fixed:4096")) == "fixed:4096"
    for bad in ("on", "sometimes", "fixed", "fixed:", "fixed:12XB", "adaptive:3", "off:1"):
        with pytest.raises(ValueError, match=r"cache mode|byte size"):
            CacheMode.parse(bad)
    assert parse_bytes("2k") == 2048 and parse_bytes("3 KiB") == 3072 and parse_bytes("5kb") == 5000
    assert format_bytes(3 << 30) == "3.0GiB"


def memory_model(per_sample: int) -> MemoryModel:
    """Budget for 2000 rows at batch 0, shrinking by `per_sample` bytes per sample."""
    return MemoryModel(
        device_budget_bytes=2000 * SLOT, parameter_bytes=0, fixed_bytes=0, per_sample_bytes=per_sample
    )


def adaptive(per_sample: int = SLOT, **load: float) -> AdaptiveCacheManager:
    load_config = LoadMonitorConfig(window_s=1.0, min_dwell_s=0.5, **load)  # type: ignore[arg-type]
    config = CacheConfig(ways=8, load=load_config, sketch_candidates=512, min_bytes=0)
    return AdaptiveCacheManager(ADAPTIVE, DIM, "cpu", memory_model(per_sample), config=config, max_batch=1024)


def run_batch(
    manager: AdaptiveCacheManager,
    tables: list[torch.Tensor],
    batch_size: int,
    gen: torch.Generator,
    mode: str = "sum",
) -> int:
    """One request as the ranker serves it (raw wire: misses are admitted); checks exactness."""
    batch = make_batch(TABLE_ROWS, batch_size, max_bag=5, gen=gen)
    token = manager.fetch_token()
    part = manager.cached_part(batch.keys, batch.offsets)
    manager.observe(batch.keys)
    pooled = pool_with_cache(part.sums, part.hit, tables, batch, mode)
    torch.testing.assert_close(pooled, reference_pool(tables, batch, mode))
    manager.admit(batch.keys[part.miss], rows_of(tables, batch.keys[part.miss]), token)
    return part.hits


def test_off_misses_everything() -> None:
    manager = AdaptiveCacheManager(CacheMode.parse("off"), DIM, "cpu")
    tables = make_tables(TABLE_ROWS, DIM)
    gen = torch.Generator().manual_seed(0)
    for now in range(5):
        assert manager.before_batch(8, 0, float(now)) is None
        assert run_batch(manager, tables, 8, gen) == 0
    stats = manager.stats()
    assert stats.capacity_bytes == stats.hits == stats.bytes_saved == 0
    assert stats.lookups > 0
    assert manager.warm_candidates(10).keys.numel() == 0


def test_fixed_keeps_its_size_and_hits() -> None:
    manager = AdaptiveCacheManager(CacheMode.parse("fixed:8KiB"), DIM, "cpu", config=CacheConfig(ways=4))
    tables = make_tables(TABLE_ROWS, DIM)
    gen = torch.Generator().manual_seed(1)
    for now in range(10):
        manager.before_batch(1024 if now % 2 else 4, 0, float(now))
        run_batch(manager, tables, 16, gen, mode="mean")
    stats = manager.stats()
    assert stats.resizes == 0
    assert stats.capacity_bytes == (8192 // SLOT // 4) * 4 * SLOT
    assert stats.hits > 0 and 0 < stats.hit_rate < 1
    assert stats.bytes_saved >= stats.hits * 8


def test_adaptive_shrinks_before_a_big_batch_and_grows_when_load_falls() -> None:
    manager = adaptive()
    tables = make_tables(TABLE_ROWS, DIM)
    gen = torch.Generator().manual_seed(2)
    start_rows = manager.cache.capacity_rows
    assert start_rows <= 2000 - 1024  # starts sized for max_batch
    now = 0.0
    for _ in range(20):  # low load: grows, then fills
        now += 0.1
        manager.before_batch(16, 0, now)
        run_batch(manager, tables, 16, gen)
    grown = manager.stats()
    assert grown.grows >= 1 and grown.capacity_rows > start_rows and grown.rows > 0
    event = manager.before_batch(900, 0, now + 0.1)  # a big batch: shrink right now
    assert event is not None and event.new_bytes < event.old_bytes
    assert manager.cache.capacity_bytes <= manager.memory.cache_budget(900)  # type: ignore[union-attr]
    run_batch(manager, tables, 900, gen)


def test_a_shrink_holds_off_growing_for_a_while() -> None:
    manager = adaptive()
    manager.before_batch(16, 0, 0.0)  # light load from the start: grows at once
    assert manager.stats().grows == 1
    assert manager.before_batch(900, 0, 0.1) is not None  # a burst: shrinks at once
    grow_after = manager.config.grow_after_s
    for now in np.arange(1.2, 0.1 + grow_after, 0.5):  # light again, but too soon to grow
        assert manager.before_batch(16, 0, float(now)) is None
    event = manager.before_batch(16, 0, 0.2 + grow_after)
    assert event is not None and event.new_bytes > event.old_bytes
    assert manager.stats().grows == 2


def test_mid_traffic_resizes_stay_exact() -> None:
    manager = adaptive(per_sample=3 * SLOT, enter_high=0.5, exit_high=0.2)
    tables = make_tables(TABLE_ROWS, DIM)
    gen = torch.Generator().manual_seed(3)
    sizes = [4, 8, 300, 16, 4, 600, 2, 2, 2, 2, 128, 4, 4, 4, 4, 4, 500, 8]
    now = 0.0
    for i, batch_size in enumerate(sizes * 2):
        now += 0.3
        manager.before_batch(batch_size, batch_size // 2, now)
        run_batch(manager, tables, batch_size, gen, mode="mean" if i % 2 else "sum")
        warm = manager.warm_candidates(manager.free_rows())
        manager.admit(warm.keys, rows_of(tables, warm.keys), warm.token)
        assert manager.cache.num_rows <= manager.cache.capacity_rows
    stats = manager.stats()
    assert stats.shrinks >= 2 and stats.grows >= 2 and stats.evicted_by_resize > 0
    assert stats.hits > 0


def test_bytes_saved_counts_indices_and_the_partials_of_wholly_cached_bags() -> None:
    manager = AdaptiveCacheManager(CacheMode.parse("fixed:64KiB"), DIM, "cpu")
    manager.admit(torch.tensor([1, 2, 4]), torch.ones(3, DIM))
    part = manager.cached_part(torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 2, 3, 3, 5]))
    assert part.hits == 3
    # 3 indices not sent, and one bag (1 2) whose partial sum is not returned; the empty bag counts not
    assert manager.stats().bytes_saved == 3 * 8 + 1 * 4 * DIM


def test_invalidated_rows_are_never_served_even_from_a_racing_fetch() -> None:
    manager = AdaptiveCacheManager(CacheMode.parse("fixed:64KiB"), DIM, "cpu")
    keys = torch.tensor([1, 2, 3])
    old = torch.ones(3, DIM)
    manager.admit(keys, old)
    token = manager.fetch_token()  # a background fetch reads the old values ...
    assert manager.invalidate(torch.tensor([2])) == 1  # ... the source changes row 2 ...
    assert manager.admit(keys, old, token) == 2  # ... the stale row 2 is refused
    offsets = torch.arange(4)
    part = manager.cached_part(keys, offsets)
    assert part.hit.tolist() == [True, False, True]
    new = torch.full((1, DIM), 7.0)
    manager.admit(torch.tensor([2]), new, manager.fetch_token())
    part = manager.cached_part(keys, offsets)
    assert part.hit.all() and (part.sums[1] == 7.0).all()
    assert manager.stats().admits_dropped_stale == 1


def test_warm_candidates_are_the_hot_missing_rows() -> None:
    manager = AdaptiveCacheManager(CacheMode.parse("fixed:64KiB"), DIM, "cpu")
    stream = torch.tensor([10] * 50 + [20] * 30 + [30] * 20 + list(range(100, 140)))
    manager.observe(stream)
    manager.admit(torch.tensor([10]), torch.zeros(1, DIM))
    assert manager.warm_candidates(2).keys.tolist() == [20, 30]


def test_concurrent_warming_keeps_requests_exact() -> None:
    manager = AdaptiveCacheManager(CacheMode.parse("fixed:16KiB"), DIM, "cpu", config=CacheConfig(ways=4))
    tables = make_tables(TABLE_ROWS, DIM)
    stop = threading.Event()

    def warmer() -> None:
        while not stop.is_set():
            warm = manager.warm_candidates(32)
            manager.admit(warm.keys, rows_of(tables, warm.keys), warm.token)
            manager.invalidate(warm.keys[:2])

    thread = threading.Thread(target=warmer)
    thread.start()
    try:
        gen = torch.Generator().manual_seed(4)
        for now in range(30):
            manager.before_batch(32, 0, float(now))
            run_batch(manager, tables, 32, gen)
    finally:
        stop.set()
        thread.join()
    assert manager.stats().hits > 0


def test_for_model_calibrates_adaptive() -> None:
    dense = DenseArch(preset("tiny")).eval()
    config = CacheConfig(safety_margin_bytes=0)
    manager = AdaptiveCacheManager.for_model(
        ADAPTIVE, dense, "cpu", config=config, device_budget_bytes=64 << 20
    )
    assert manager.memory is not None
    assert 0 < manager.cache.capacity_bytes <= manager.memory.cache_budget(manager.monitor.max_batch)
    with pytest.raises(ValueError, match="MemoryModel"):
        AdaptiveCacheManager(CacheMode.parse("adaptive"), DIM, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda() -> None:
    dense = DenseArch(preset("tiny")).eval().to("cuda")
    config = CacheConfig(safety_margin_bytes=0)
    manager = AdaptiveCacheManager.for_model(
        ADAPTIVE, dense, "cuda", config=config, device_budget_bytes=256 << 20
    )
    tables = make_tables(TABLE_ROWS, DIM)
    batch = make_batch(TABLE_ROWS, 16, max_bag=4, gen=torch.Generator().manual_seed(5))
    manager.before_batch(16, 0, 0.0)
    manager.admit(batch.keys, rows_of(tables, batch.keys))
    part = manager.cached_part(batch.keys.cuda(), batch.offsets.cuda())
    assert part.hit.all() and part.sums.is_cuda
    torch.testing.assert_close(part.sums.cpu(), reference_pool(tables, batch, "sum"))


def test_warming_fills_a_cache_bigger_than_the_candidate_list() -> None:
    config = CacheConfig(sketch_candidates=64)
    manager = AdaptiveCacheManager(CacheMode.parse("fixed:64KiB"), DIM, "cpu", config=config)
    tables = make_tables(TABLE_ROWS, DIM)
    gen = torch.Generator().manual_seed(6)
    for _ in range(30):
        batch = make_batch(TABLE_ROWS, 32, max_bag=8, gen=gen, zipf=0.8)
        manager.observe(batch.keys)
        warm = manager.warm_candidates(manager.free_rows())
        manager.admit(warm.keys, rows_of(tables, warm.keys), warm.token)
    assert manager.cache.num_rows > 4 * config.sketch_candidates


def test_adaptive_drops_a_cache_smaller_than_min_bytes() -> None:
    load = LoadMonitorConfig(window_s=1.0, min_dwell_s=0.5)
    config = CacheConfig(ways=8, load=load, min_bytes=1000 * SLOT)
    manager = AdaptiveCacheManager(
        ADAPTIVE, DIM, "cpu", memory_model(per_sample=SLOT), config=config, max_batch=1024
    )
    assert manager.cache.capacity_rows == 0  # 2000 - 1024 rows would be left: below min_bytes
    tables = make_tables(TABLE_ROWS, DIM)
    gen = torch.Generator().manual_seed(7)
    assert run_batch(manager, tables, 8, gen) == 0  # exact with no cache at all
    manager.before_batch(8, 0, 0.1)  # light load: room for ~1990 rows
    assert manager.cache.capacity_rows > 1000
    event = manager.before_batch(1024, 0, 0.2)
    assert event is not None and event.new_bytes == manager.cache.capacity_bytes == 0
