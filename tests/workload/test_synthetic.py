from __future__ import annotations

import numpy as np
import pytest

from flexemr.batch import SparseBatch
from flexemr.model.presets import preset
from flexemr.model.spec import ModelSpec
from flexemr.workload import SyntheticConfig, SyntheticWorkload
from flexemr.workload.powerlaw import RowPermutation

SPEC = ModelSpec(
    table_rows=(100_000, 5_000, 300),
    dim=8,
    bottom_mlp=(5, 8),
    top_mlp=(1,),
    pooling_factors=(10, 3, 1),
)


def _top_share(ids: np.ndarray, fraction: float) -> float:
    """Share of lookups that go to the hottest `fraction` of the table's distinct rows."""
    counts = np.sort(np.unique(ids, return_counts=True)[1])[::-1]
    return float(counts[: max(1, int(len(counts) * fraction))].sum() / counts.sum())


@pytest.mark.parametrize(
    "config",
    [
        SyntheticConfig(),
        SyntheticConfig(bag_sizes="fixed", alpha=(0.0, 0.9, 1.05)),
        SyntheticConfig(bag_sizes="uniform", empty_prob=0.5, table_mix=(1.0, 0.0, 3.0)),
        SyntheticConfig(cooccurrence=0.8, group_size=4, max_bag=5),
    ],
)
def test_requests_are_valid(config: SyntheticConfig) -> None:
    request = SyntheticWorkload(SPEC, config, seed=1).generate(257)
    assert request.batch_size == 257
    assert request.dense.shape == (257, 5)
    assert request.lengths.shape == (3 * 257,)
    request.check(SPEC)  # dtypes, row ranges, lengths sum
    assert request.lengths.max() <= config.max_bag


def test_table_mix_and_empty_bags() -> None:
    config = SyntheticConfig(bag_sizes="fixed", table_mix=(1.0, 0.0, 2.0), empty_prob=0.25)
    lengths = SyntheticWorkload(SPEC, config, seed=2).generate(4000).table_lengths()
    assert (lengths[1] == 0).all()
    assert set(np.unique(lengths[0])) == {0, 10}
    assert set(np.unique(lengths[2])) == {0, 2}
    assert 0.2 < (lengths[0] == 0).mean() < 0.3


def test_same_seed_same_requests() -> None:
    def draw(seed: int) -> list[SparseBatch]:
        workload = SyntheticWorkload(SPEC, SyntheticConfig(cooccurrence=0.3), seed)
        return [workload.generate(64) for _ in range(3)]

    a, b, c = draw(7), draw(7), draw(8)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.indices, y.indices) and np.array_equal(x.lengths, y.lengths)
        assert np.array_equal(x.dense, y.dense)
    assert not np.array_equal(a[0].indices, a[1].indices)
    assert not np.array_equal(a[0].indices, c[0].indices)


def test_skew_grows_with_alpha_and_hot_rows_are_scattered() -> None:
    shares = []
    for alpha in (0.0, 0.6, 0.9, 1.05):
        request = SyntheticWorkload(SPEC, SyntheticConfig(alpha=alpha), seed=0).generate(4000)
        shares.append(_top_share(request.table_indices(0), 0.01))
    assert shares == sorted(shares)
    assert shares[0] < 0.03 and shares[-1] > 0.3

    request = SyntheticWorkload(SPEC, SyntheticConfig(alpha=1.05), seed=0).generate(4000)
    ids, counts = np.unique(request.table_indices(0), return_counts=True)
    hottest = ids[np.argsort(counts)[::-1][:20]]
    assert hottest.max() > 1000  # not just the low ids


def test_row_permutation_is_a_bijection() -> None:
    perm = RowPermutation(1000, seed=5)
    ranks = np.arange(1000)
    ids = perm(ranks)
    assert np.array_equal(np.sort(ids), ranks)
    assert np.array_equal(perm.inverse(ids), ranks)


def _repeated_pair_share(request: SparseBatch, table: int) -> float:
    """Share of within-bag row pairs (first two rows of each bag) that occur more than once."""
    lengths = request.table_lengths()[table]
    ids = request.table_indices(table)
    starts = (np.cumsum(lengths) - lengths)[lengths >= 2]
    pairs = np.sort(np.stack([ids[starts], ids[starts + 1]], axis=1), axis=1)
    _, counts = np.unique(pairs, axis=0, return_counts=True)
    return float(counts[counts > 1].sum() / counts.sum())


def test_cooccurrence_makes_row_pairs_repeat() -> None:
    spec = preset("tiny").with_overrides(table_rows=(20_000, 50, 200, 30), pooling_factors=(4, 2, 4, 1))

    def share(p: float) -> float:
        config = SyntheticConfig(alpha=0.9, cooccurrence=p, group_size=4)
        return _repeated_pair_share(SyntheticWorkload(spec, config, seed=0).generate(5000), 0)

    none, some, most = share(0.0), share(0.3), share(0.9)
    assert none < some < most
    assert most > none + 0.3
