"""The data-driven workloads: the Meta-fitted preset, Criteo replay and MLPerf query sizes."""

from __future__ import annotations

import numpy as np
import pytest

from flexemr.workload import (
    CRITEO_SAMPLE,
    META_ALPHA,
    META_BATCH,
    META_STATS_2022,
    MLPERF_QUERY_SIZES,
    CriteoReplay,
    QuerySizes,
    SyntheticConfig,
    SyntheticWorkload,
    criteo_spec,
    data_dir,
    fit_alpha,
    load_locality_stats,
    meta_spec,
    meta_workload,
    reuse_histogram,
    total_variation,
)
from flexemr.workload.meta import reuse_counts

MAX_TV = 0.1
"""Total variation distance allowed between the generated and Meta's reuse histogram (the fitted
preset reaches about 0.07; uniform rows on the same tables are at about 0.23)."""


@pytest.fixture(scope="module")
def meta_stats():  # type: ignore[no-untyped-def]
    return load_locality_stats(data_dir() / META_STATS_2022)


def test_locality_stats_parse(meta_stats) -> None:  # type: ignore[no-untyped-def]
    assert meta_stats.batches == 16
    assert meta_stats.reuse_histogram[0] == pytest.approx(0.342)
    assert meta_stats.reuse_histogram.sum() == pytest.approx(1.0, abs=0.01)
    assert meta_stats.mean_reuse == pytest.approx(12.7, abs=0.1)


@pytest.mark.parametrize("seed", [0, 1])
def test_meta_preset_reuse_histogram_is_close_to_meta(meta_stats, seed: int) -> None:  # type: ignore[no-untyped-def]
    request = meta_workload(seed).generate(META_BATCH)
    assert total_variation(reuse_histogram(request), meta_stats.reuse_histogram) < MAX_TV
    assert reuse_counts(request).mean() == pytest.approx(meta_stats.mean_reuse, rel=0.1)

    uniform = SyntheticWorkload(meta_spec(), SyntheticConfig(alpha=0.0), seed).generate(META_BATCH)
    assert total_variation(reuse_histogram(uniform), meta_stats.reuse_histogram) > 2 * MAX_TV


def test_fit_recovers_the_preset_exponent(meta_stats) -> None:  # type: ignore[no-untyped-def]
    assert fit_alpha(meta_stats, meta_spec()) == pytest.approx(META_ALPHA, abs=0.02)


def test_criteo_replay_parses_all_rows() -> None:
    spec = criteo_spec(rows_per_table=1000, dim=8)
    replay = CriteoReplay(data_dir() / CRITEO_SAMPLE, spec)
    assert len(replay) == 1000
    request = replay.all
    request.check(spec)
    assert request.dense.shape == (1000, 13)
    assert (request.dense >= 0).all()
    assert set(np.unique(replay.labels)) == {0, 1}
    assert set(np.unique(request.lengths)) == {0, 1}  # one-hot; missing values are empty bags
    assert 0 < (request.lengths == 0).mean() < 0.5

    # Row 1 of the file, checked by hand against the preprocessing rules.
    fields = (data_dir() / CRITEO_SAMPLE).read_text().splitlines()[0].split("\t")
    fields += [""] * (40 - len(fields))
    expected_dense = [np.log1p(max(float(f), 0.0)) if f else 0.0 for f in fields[1:14]]
    assert np.allclose(request.dense[0], expected_dense, atol=1e-6)
    lengths = request.table_lengths()
    for t, h in enumerate(fields[14:]):
        assert lengths[t, 0] == (1 if h else 0)
    first = request.take([0])
    assert first.indices.tolist() == [int(h, 16) % 1000 for h in fields[14:] if h]


def test_criteo_replay_wraps_and_refuses_wrong_specs() -> None:
    replay = CriteoReplay(data_dir() / CRITEO_SAMPLE, criteo_spec(97))
    replay.generate(900)
    wrapped = replay.generate(200)
    assert np.array_equal(wrapped.dense[100:], replay.all.dense[:100])
    with pytest.raises(ValueError, match="13 dense features and 26 tables"):
        CriteoReplay(data_dir() / CRITEO_SAMPLE, meta_spec())


def test_query_sizes_follow_mlperf_quantiles() -> None:
    sizes = QuerySizes.load(data_dir() / MLPERF_QUERY_SIZES)
    assert len(sizes.quantiles) == 20
    drawn = sizes.sample(np.random.default_rng(0), 20_000)
    assert drawn.min() == 100 and drawn.max() == 700
    assert set(np.unique(drawn)) <= set(sizes.quantiles.tolist())
    assert drawn.mean() == pytest.approx(sizes.mean, rel=0.03)
    assert sizes.mean == pytest.approx(270.0)
