"""The cost gate: an A/B over batches that keeps the cache only where it speeds lookups up."""

from __future__ import annotations

import pytest

from flexemr.cache.cost_gate import CostGate
from flexemr.config.cache import CostGateConfig

KEYS = 1000


def run(gate: CostGate, batches: int, with_cache_s: float, without_s: float) -> list[bool]:
    """Feed `batches` batches whose lookup phase costs the given seconds per arm; the arms used."""
    used = []
    for _ in range(batches):
        arm = gate.use_cache(KEYS)
        gate.record(arm, KEYS, with_cache_s if arm else without_s)
        used.append(arm)
    return used


def test_alternates_until_both_arms_are_measured() -> None:
    gate = CostGate(CostGateConfig(warmup=3))
    assert run(gate, 6, 1.0, 1.0) == [True, False, True, False, True, False]


def test_keeps_the_cache_where_it_is_cheaper_and_probes_the_other_arm() -> None:
    gate = CostGate(CostGateConfig(probe_every=8, warmup=2))
    used = run(gate, 100, with_cache_s=0.001, without_s=0.004)
    assert gate.chosen
    assert used[20:].count(False) == len(used[20:]) // 8  # only the probes bypass it
    assert gate.cost[True] == pytest.approx(0.001 / KEYS)
    assert gate.cost[False] == pytest.approx(0.004 / KEYS)


def test_bypasses_a_cache_that_slows_lookups_down() -> None:
    gate = CostGate(CostGateConfig(probe_every=8, warmup=2))
    used = run(gate, 100, with_cache_s=0.006, without_s=0.003)
    assert not gate.chosen
    assert used[20:].count(True) == len(used[20:]) // 8


def test_follows_a_change_in_load() -> None:
    """Servers saturate: remote keys get dearer and the cache becomes worth consulting."""
    gate = CostGate(CostGateConfig(probe_every=4, warmup=2, smoothing=0.5))
    run(gate, 40, with_cache_s=0.006, without_s=0.003)
    assert not gate.chosen
    run(gate, 60, with_cache_s=0.006, without_s=0.020)
    assert gate.chosen


def test_noise_within_the_margin_does_not_flip_it() -> None:
    gate = CostGate(CostGateConfig(probe_every=4, warmup=2, smoothing=1.0, margin=0.2))
    run(gate, 10, with_cache_s=0.001, without_s=0.002)
    assert gate.chosen
    run(gate, 40, with_cache_s=0.0021, without_s=0.002)  # 5% worse: within the margin
    assert gate.chosen


def test_cost_is_per_key() -> None:
    gate = CostGate(CostGateConfig(warmup=1, smoothing=1.0))
    gate.record(True, 100, 0.001)
    gate.record(False, 10_000, 0.05)
    assert gate.cost[True] == pytest.approx(1e-5)
    assert gate.cost[False] == pytest.approx(5e-6)
    assert not gate.chosen
    gate.record(True, 0, 1.0)  # an empty batch says nothing
    assert gate.cost[True] == pytest.approx(1e-5)


def test_a_probe_waits_for_a_small_batch() -> None:
    gate = CostGate(CostGateConfig(probe_every=4, warmup=1, probe_max_keys=KEYS))
    run(gate, 2, with_cache_s=0.006, without_s=0.003)
    assert not gate.chosen
    assert [gate.use_cache(10 * KEYS) for _ in range(12)] == [False] * 12  # big batches: no probe
    assert gate.use_cache(KEYS), "the first small batch is the overdue probe"
    assert not gate.use_cache(KEYS)


@pytest.mark.parametrize(
    ("field", "value"),
    [("probe_every", 1), ("probe_max_keys", 0), ("warmup", 0), ("smoothing", 0.0), ("margin", -0.1)],
)
def test_bad_config_is_refused(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        CostGateConfig(**{field: value})  # type: ignore[arg-type]
