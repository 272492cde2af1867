"""Dynamic batching of the dense model: one forward at a time, the requests that wait for it merged,
no score changed."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from flexemr.batch import SparseBatch
from flexemr.model.presets import preset
from flexemr.model.weights import PresetWeights, build_monolithic
from flexemr.ranker.admission import Dropped, Ticket
from flexemr.ranker.batcher import DenseBatcher
from tests.core.helpers import random_batch

SPEC = preset("tiny")
MODEL = build_monolithic(PresetWeights(SPEC, seed=2))


def inputs(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's dense features and pooled embeddings, as the ranker hands them to the model."""
    made = SparseBatch(*random_batch(SPEC, batch, seed))
    with torch.inference_mode():
        pooled = MODEL.pool(torch.from_numpy(made.indices), torch.from_numpy(made.lengths), batch)
    return torch.from_numpy(made.dense), pooled


def alone(dense: torch.Tensor, pooled: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        scores: np.ndarray = MODEL(dense, pooled).numpy()
    return scores


class CountingModel:
    """The dense model, recording each forward's batch size and how many ran at once."""

    def __init__(self, hold_first: threading.Event | None = None) -> None:
        self.sizes: list[int] = []
        self.inside = self.most_inside = 0
        self.started = threading.Event()
        self.hold_first = hold_first
        self.lock = threading.Lock()

    def __call__(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.sizes.append(int(dense.shape[0]))
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            first = len(self.sizes) == 1
        self.started.set()
        if first and self.hold_first is not None:
            assert self.hold_first.wait(30)
        try:
            return MODEL(dense, pooled)  # type: ignore[no-any-return]
        finally:
            with self.lock:
                self.inside -= 1


def run(batcher: DenseBatcher, request: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
    with torch.inference_mode():
        return batcher.run(*request).numpy()


def test_concurrent_requests_run_one_forward_at_a_time_merged_with_scores_unchanged() -> None:
    model = CountingModel()
    batcher = DenseBatcher(model, max_batch=16)
    requests = [inputs(1 + i % 4, i) for i in range(60)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda r: run(batcher, r), requests))
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_allclose(result, alone(*request), atol=1e-6)
    assert model.most_inside == 1
    assert max(model.sizes) <= 16
    assert sum(model.sizes) == sum(int(r[0].shape[0]) for r in requests)
    assert (batcher.batches, batcher.requests) == (len(model.sizes), len(requests))


def test_requests_that_wait_for_a_running_forward_are_merged_into_the_next() -> None:
    release = threading.Event()
    model = CountingModel(hold_first=release)
    batcher = DenseBatcher(model, max_batch=16)
    first = inputs(2, 0)
    waiting = [inputs(1 + i % 3, 10 + i) for i in range(5)]
    with ThreadPoolExecutor(6) as pool:
        head = pool.submit(run, batcher, first)
        assert model.started.wait(30)
        rest = [pool.submit(run, batcher, r) for r in waiting]
        while batcher._queued_samples < sum(int(r[0].shape[0]) for r in waiting):  # all queued
            threading.Event().wait(0.01)
        release.set()
        np.testing.assert_allclose(head.result(30), alone(*first), atol=1e-6)
        for request, future in zip(waiting, rest, strict=True):
            np.testing.assert_allclose(future.result(30), alone(*request), atol=1e-6)
    assert model.sizes == [2, sum(int(r[0].shape[0]) for r in waiting)]  # alone, then merged


def test_a_merged_forward_never_exceeds_max_batch() -> None:
    release = threading.Event()
    model = CountingModel(hold_first=release)
    batcher = DenseBatcher(model, max_batch=5)
    waiting = [inputs(3, 10 + i) for i in range(4)]
    with ThreadPoolExecutor(5) as pool:
        head = pool.submit(run, batcher, inputs(1, 0))
        assert model.started.wait(30)
        rest = [pool.submit(run, batcher, r) for r in waiting]
        while batcher._queued_samples < 12:
            threading.Event().wait(0.01)
        release.set()
        head.result(30)
        for request, future in zip(waiting, rest, strict=True):
            np.testing.assert_allclose(future.result(30), alone(*request), atol=1e-6)
    assert model.sizes == [1, 3, 3, 3, 3]  # two requests of 3 do not fit 5 samples


def test_a_failing_forward_fails_its_requests_and_the_next_ones_still_run() -> None:
    calls = []

    def failing_once(dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        calls.append(int(dense.shape[0]))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return MODEL(dense, pooled)  # type: ignore[no-any-return]

    batcher = DenseBatcher(failing_once, max_batch=8)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(batcher, inputs(2, 0))
    request = inputs(3, 1)
    np.testing.assert_allclose(run(batcher, request), alone(*request), atol=1e-6)


def test_a_window_waits_for_more_requests_before_the_forward() -> None:
    model = CountingModel()
    batcher = DenseBatcher(model, max_batch=64, window_s=0.5)
    requests = [inputs(2, i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda r: run(batcher, r), requests))
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_allclose(result, alone(*request), atol=1e-6)
    assert sum(model.sizes) == 8
    assert len(model.sizes) < 4  # the first forward waited and took others with it


def test_a_request_whose_deadline_passes_while_it_waits_is_dropped_not_computed() -> None:
    release = threading.Event()
    model = CountingModel(hold_first=release)
    batcher = DenseBatcher(model, max_batch=16)
    late = Ticket(deadline=time.monotonic() + 0.05, timeout_s=0.05)
    on_time = Ticket(deadline=time.monotonic() + 60, timeout_s=60)
    first, dropped, kept = inputs(2, 0), inputs(3, 1), inputs(4, 2)

    def run_with(request: tuple[torch.Tensor, torch.Tensor], ticket: Ticket) -> np.ndarray:
        with torch.inference_mode():
            return batcher.run(*request, ticket).numpy()

    with ThreadPoolExecutor(3) as pool:
        head = pool.submit(run, batcher, first)
        assert model.started.wait(30)
        waiting = [pool.submit(run_with, dropped, late), pool.submit(run_with, kept, on_time)]
        while batcher._queued_samples < 7:
            time.sleep(0.01)
        time.sleep(0.1)  # the late one's deadline passes while the first forward runs
        release.set()
        head.result(30)
        with pytest.raises(Dropped, match="deadline"):
            waiting[0].result(30)
        np.testing.assert_allclose(waiting[1].result(30), alone(*kept), atol=1e-6)
    assert model.sizes == [2, 4]  # the dropped request's samples never reached the model
