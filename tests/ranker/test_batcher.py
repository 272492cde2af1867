"""Dynamic batching merges requests without changing any score."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from flexemr.batch import SparseBatch, concat
from flexemr.model.presets import preset
from flexemr.model.weights import PresetWeights, build_monolithic
from flexemr.ranker.batcher import DynamicBatcher
from tests.core.helpers import random_batch, reference_scores

SPEC = preset("tiny")
MODEL = build_monolithic(PresetWeights(SPEC, seed=2))


def score(batch: SparseBatch) -> np.ndarray:
    return reference_scores(MODEL, batch.dense, batch.indices, batch.lengths)


def make(batch: int, seed: int) -> SparseBatch:
    made = SparseBatch(*random_batch(SPEC, batch, seed))
    made.check(SPEC, max_batch=64, max_per_sample=64)
    return made


def test_concat_keeps_each_requests_bags() -> None:
    parts = [make(b, seed) for seed, b in enumerate([1, 3, 2])]
    merged = concat(parts)
    assert merged.batch_size == 6
    np.testing.assert_allclose(score(merged), np.concatenate([score(p) for p in parts]), atol=1e-6)


def test_concurrent_requests_are_merged_and_scores_unchanged() -> None:
    calls: list[int] = []
    lock = threading.Lock()

    def counting(batch: SparseBatch) -> np.ndarray:
        with lock:
            calls.append(batch.batch_size)
        return score(batch)

    batcher = DynamicBatcher(counting, max_batch=16, window_s=0.05, workers=1)
    requests = [make(1 + i % 4, i) for i in range(40)]
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda b: batcher.submit(b).result(), requests))
    finally:
        batcher.close()
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_allclose(result, score(request), atol=1e-6)
    assert max(calls) <= 16
    assert len(calls) < len(requests)  # some requests were merged


def test_a_failing_batch_fails_its_requests_only() -> None:
    def failing(batch: SparseBatch) -> np.ndarray:
        raise RuntimeError("lookup failed")

    batcher = DynamicBatcher(failing, max_batch=8, window_s=0.0, workers=1)
    try:
        future = batcher.submit(make(2, 0))
        assert isinstance(future.exception(timeout=10), RuntimeError)
    finally:
        batcher.close()


def test_without_a_window_requests_that_wait_for_a_running_batch_are_merged_into_the_next() -> None:
    running, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def slow_first(batch: SparseBatch) -> np.ndarray:
        calls.append(batch.batch_size)
        if len(calls) == 1:  # holds the first batch until the others have queued behind it
            running.set()
            release.wait(30)
        return score(batch)

    batcher = DynamicBatcher(slow_first, max_batch=16, window_s=0.0, workers=1)
    try:
        first = batcher.submit(make(2, 0))
        running.wait(30)
        waiting = [make(1 + i % 3, 10 + i) for i in range(5)]
        futures = [batcher.submit(b) for b in waiting]
        release.set()
        np.testing.assert_allclose(first.result(30), score(make(2, 0)), atol=1e-6)
        for request, future in zip(waiting, futures, strict=True):
            np.testing.assert_allclose(future.result(30), score(request), atol=1e-6)
    finally:
        batcher.close()
    assert calls == [2, sum(b.batch_size for b in waiting)]  # alone, then the five merged at once
