from __future__ import annotations

import torch

from flexemr.cache.sketch import FrequencySketch


def zipf_stream(n_keys: int, draws: int, alpha: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys drawn, key ids by true popularity); keys are a random permutation of ranks."""
    gen = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, n_keys + 1, dtype=torch.float64) ** alpha
    ids = torch.randperm(n_keys, generator=gen) * 7 + 3  # spread over a wider key space
    return ids[torch.multinomial(weights, draws, replacement=True, generator=gen)], ids


def test_finds_the_heavy_hitters_of_a_zipf_stream() -> None:
    stream, _ = zipf_stream(100_000, 200_000, 1.1, seed=0)
    sketch = FrequencySketch(width=1 << 14, depth=4, candidates=256, half_life=1e9)
    for batch in stream.split(4096):
        sketch.observe(batch)
    keys, counts = torch.unique(stream, return_counts=True)
    true_top = set(keys[torch.topk(counts, 20).indices].tolist())
    found = set(sketch.hottest_missing(20).tolist())
    assert len(true_top & found) >= 18


def test_estimates_never_undercount_without_aging() -> None:
    stream, _ = zipf_stream(5_000, 30_000, 0.9, seed=1)
    sketch = FrequencySketch(width=1 << 10, depth=3, half_life=1e12)
    for batch in stream.split(1000):
        sketch.observe(batch)
    keys, counts = torch.unique(stream, return_counts=True)
    estimates = sketch.estimate(keys)
    assert (estimates >= counts.to(torch.float32) - 1e-2).all()
    assert estimates.sum() < 3 * counts.sum()  # and collisions stay modest


def test_excludes_cached_keys() -> None:
    sketch = FrequencySketch(width=1 << 8)
    sketch.observe(torch.tensor([5] * 10 + [6] * 5 + [7] * 2))
    cached = lambda keys: keys == 5  # noqa: E731
    assert sketch.hottest_missing(2, cached).tolist() == [6, 7]
    assert sketch.hottest_missing(1).tolist() == [5]
    assert sketch.hottest_missing(0).numel() == 0


def test_aging_follows_drift() -> None:
    first, ids = zipf_stream(10_000, 40_000, 1.2, seed=2)
    remap = torch.roll(ids, 5000)  # a different hot set
    lookup = torch.empty(int(ids.max()) + 1, dtype=torch.int64)
    lookup[ids] = remap
    second = lookup[first]
    sketch = FrequencySketch(width=1 << 14, candidates=128, half_life=5_000)
    for batch in torch.cat([first, second]).split(2000):
        sketch.observe(batch)
    keys, counts = torch.unique(second, return_counts=True)
    now_hot = set(keys[torch.topk(counts, 10).indices].tolist())
    assert len(now_hot & set(sketch.hottest_missing(10).tolist())) >= 8


def test_candidates_leave_out_cached_keys() -> None:
    sketch = FrequencySketch(width=1 << 8, candidates=2)
    cached = lambda keys: keys < 3  # noqa: E731
    sketch.observe(torch.tensor([1] * 9 + [2] * 8 + [5] * 3 + [6] * 2 + [7]), cached)
    assert sketch.candidates.tolist() == [5, 6]  # the hot cached keys would have taken both places


def test_big_batches_are_counted_from_a_weighted_sample() -> None:
    stream, _ = zipf_stream(100_000, 400_000, 1.1, seed=3)
    sampled = FrequencySketch(width=1 << 14, candidates=256, half_life=1e12, sample=4096)
    for batch in stream.split(100_000):
        sampled.observe(batch)
    keys, counts = torch.unique(stream, return_counts=True)
    top = torch.topk(counts, 20)
    assert len(set(keys[top.indices].tolist()) & set(sampled.hottest_missing(20).tolist())) >= 18
    estimates = sampled.estimate(keys[top.indices])
    torch.testing.assert_close(estimates, top.values.to(torch.float32), rtol=0.25, atol=0)
