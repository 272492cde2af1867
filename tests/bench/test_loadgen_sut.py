"""LoadGen runs against the in-process tiny model: every sample answered, with the model's scores."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from flexemr.batch import SparseBatch
from flexemr.bench.loadgen_sut import (
    LoadGenResult,
    RunSettings,
    SamplePool,
    TorchBackend,
    find_peak_server_qps,
    run_offline,
    run_server,
)
from flexemr.model.presets import preset
from flexemr.model.weights import PresetWeights, build_monolithic
from flexemr.workload import MLPERF_QUERY_SIZES, QuerySizes, SyntheticWorkload, data_dir


class RecordingBackend(TorchBackend):
    """The monolithic model, remembering every request it scored."""

    def __init__(self) -> None:
        super().__init__(build_monolithic(PresetWeights(preset("tiny"), seed=0)))
        self.calls: list[SparseBatch] = []

    def infer(self, request: SparseBatch) -> np.ndarray:
        self.calls.append(request)
        return super().infer(request)


@pytest.fixture(scope="module")
def pool_request() -> SparseBatch:
    return SyntheticWorkload(preset("tiny"), seed=0).generate(2048)


def _check_answers(
    backend: RecordingBackend, pool: SamplePool, result: LoadGenResult, scores: dict[int, np.ndarray]
) -> None:
    assert result.errors == 0
    assert result.queries > 0
    assert result.transport == "in-process" and result.backend == "monolithic"
    assert result.log_dir.joinpath("mlperf_log_summary.txt").exists()
    # Each answered sample carries the model's scores for exactly that sample's pairs.
    for index, got in scores.items():
        expected = TorchBackend.infer(backend, pool.take([index]))
        assert got.shape == (int(pool.sizes[index]),)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_offline_answers_every_sample_with_its_scores(pool_request: SparseBatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    backend = RecordingBackend()
    pool = SamplePool.build(pool_request, num_samples=512)
    settings = RunSettings(min_duration_s=0.5, batch_size=128, offline_expected_qps=1000, log_dir=tmp_path)
    result, sut = run_offline(backend, pool, settings, capture=True)
    issued = 550  # LoadGen issues expected_qps * min_duration * 1.1 samples
    assert result.scenario == "Offline"
    assert len(sut.record.answered) == len(set(sut.record.answered)) == result.queries == issued
    assert result.pairs == issued
    assert sorted(sut.record.scores) == list(range(512))  # every pool sample was answered at least once
    assert max(c.batch_size for c in backend.calls) == 128  # batched as asked
    assert sum(c.batch_size for c in backend.calls) == issued
    _check_answers(backend, pool, result, sut.record.scores)
    assert tmp_path.joinpath("mlperf_log_detail.txt").exists()


def test_server_queries_carry_mlperf_sizes_and_their_scores(pool_request: SparseBatch) -> None:
    backend = RecordingBackend()
    sizes = QuerySizes.load(data_dir() / MLPERF_QUERY_SIZES)
    pool = SamplePool.build(pool_request, num_samples=32, sizes=sizes, seed=1)
    settings = RunSettings(min_duration_s=1.0, min_query_count=30)
    result, sut = run_server(backend, pool, target_qps=60, settings=settings, capture=True)
    assert result.scenario == "Server" and result.target_qps == 60
    assert result.queries >= 30
    assert len(sut.record.answered) == len(set(sut.record.answered)) == result.queries
    # One backend call per query, of 100-700 pairs each.
    assert len(backend.calls) == result.queries
    assert all(100 <= c.batch_size <= 700 for c in backend.calls)
    assert result.pairs == sum(c.batch_size for c in backend.calls)
    _check_answers(backend, pool, result, sut.record.scores)


def test_failing_backend_is_counted_not_hung(pool_request: SparseBatch) -> None:
    class Broken(RecordingBackend):
        def infer(self, request: SparseBatch) -> np.ndarray:
            raise RuntimeError("boom")

    pool = SamplePool.build(pool_request, num_samples=64)
    result, _ = run_offline(Broken(), pool, RunSettings(min_duration_s=0.1, offline_expected_qps=100))
    assert result.errors == result.queries > 0
    assert result.pairs == 0 and not result.meets_target


def test_qps_search_is_bounded_and_brackets(pool_request: SparseBatch) -> None:
    backend = RecordingBackend()
    pool = SamplePool.build(pool_request, num_samples=64)
    settings = RunSettings(min_duration_s=0.3, min_query_count=10, p99_target_ms=60.0)
    search = find_peak_server_qps(backend, pool, low_qps=10, high_qps=40, settings=settings, max_runs=3)
    assert 1 <= len(search.runs) <= 3
    assert search.runs[0].target_qps == 20  # the geometric middle first: low loads take longest
    passed = [r.target_qps or 0.0 for r in search.runs if r.meets_target]
    assert search.best_qps == (max(passed) if passed else 0.0)


def test_loadgen_verdict_decides_a_server_run(pool_request: SparseBatch) -> None:
    backend = RecordingBackend()
    pool = SamplePool.build(pool_request, num_samples=64)
    short, _ = run_server(
        backend, pool, 120, RunSettings(min_duration_s=0.2, min_query_count=20, p99_target_ms=1000)
    )
    assert short.loadgen_valid is False and not short.meets_target  # fast, but too few queries to tell
    assert any("early stopping" in reason for reason in short.invalid_reasons), short.invalid_reasons
    assert short.verdict.startswith("INVALID (")
    enough, _ = run_server(
        backend, pool, 120, RunSettings(min_duration_s=0.2, min_query_count=500, p99_target_ms=1000)
    )
    assert enough.queries >= 500
    assert enough.loadgen_valid is True and enough.invalid_reasons == () and enough.meets_target
    assert enough.verdict == "VALID"


def _passing_run(
    backend: RecordingBackend, pool: SamplePool, qps: float, lenient: RunSettings
) -> LoadGenResult:
    """A Server run at `qps` under a target any machine meets, however busy (60 ms was missed under
    a loaded CI), VALID as a long run would be: a search starts from it; the search is what is
    tested, not this machine's latency."""
    run, _ = run_server(backend, pool, qps, lenient)
    run = dataclasses.replace(run, loadgen_valid=True, invalid_reasons=())
    assert run.meets_target
    return run


def test_qps_search_starts_from_known_runs_and_never_loses_a_passing_load(pool_request: SparseBatch) -> None:
    backend = RecordingBackend()
    pool = SamplePool.build(pool_request, num_samples=64)
    settings = RunSettings(min_duration_s=0.3, min_query_count=10, p99_target_ms=1000.0)
    measured = _passing_run(backend, pool, 15, settings)
    known = [measured, dataclasses.replace(measured, target_qps=35.0, p99_ms=1e4)]  # missed at 35
    impossible = dataclasses.replace(settings, p99_target_ms=1e-6)  # every new run misses
    search = find_peak_server_qps(backend, pool, 1, 100, impossible, max_runs=2, known=known)
    assert [r.target_qps for r in search.runs] == [25.0, 20.0]  # bisects between the known loads
    assert search.best_qps == 15.0  # the known passing load, though every new run missed


def test_qps_search_can_stop_at_the_first_run_over_the_target(pool_request: SparseBatch) -> None:
    backend = RecordingBackend()
    pool = SamplePool.build(pool_request, num_samples=64)
    impossible = RunSettings(min_duration_s=0.3, min_query_count=10, p99_target_ms=1e-6)  # every p99 over
    full = find_peak_server_qps(backend, pool, 10, 40, impossible, max_runs=3)
    assert [r.target_qps for r in full.runs] == [20.0, 10.0]  # halves down to the floor, then stops
    quick = find_peak_server_qps(backend, pool, 10, 40, impossible, max_runs=3, give_up_over=2.0)
    assert [r.target_qps for r in quick.runs] == [20.0] and quick.best_qps == 0.0


class SlowBackend(RecordingBackend):
    """Every query takes at least 15 ms."""

    def infer(self, request: SparseBatch) -> np.ndarray:
        time.sleep(0.015)
        return super().infer(request)


def test_qps_search_walks_down_from_a_first_run_just_over_the_target(pool_request: SparseBatch) -> None:
    pool = SamplePool.build(pool_request, num_samples=64)
    just_over = RunSettings(min_duration_s=0.3, min_query_count=10, p99_target_ms=12.0)  # p99 >= 15 ms
    # "Just over" is within 1000x (12 s): however slow the machine, never far over.
    search = find_peak_server_qps(SlowBackend(), pool, 10, 40, just_over, max_runs=3, give_up_over=1000.0)
    assert [r.target_qps for r in search.runs] == [20.0, 10.0]  # walks down as the full search
    assert all(not r.meets_target and r.p99_ms > 12.0 for r in search.runs)


def test_qps_search_that_stops_over_the_target_still_bisects_above_a_passing_load(
    pool_request: SparseBatch,
) -> None:
    backend = RecordingBackend()
    pool = SamplePool.build(pool_request, num_samples=64)
    lenient = RunSettings(min_duration_s=0.3, min_query_count=10, p99_target_ms=1000.0)
    passing = _passing_run(backend, pool, 10, lenient)
    impossible = dataclasses.replace(lenient, p99_target_ms=1e-6)  # every new run over the target
    search = find_peak_server_qps(
        backend, pool, 5, 40, impossible, max_runs=3, known=[passing], give_up_over=2.0
    )
    assert [r.target_qps for r in search.runs] == [20.0, 15.0, 12.5]  # doubles, then bisects
    assert search.best_qps == 10.0
