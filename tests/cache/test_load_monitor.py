from __future__ import annotations

import pytest

from flexemr.cache.load_monitor import LoadMonitor, next_power_of_two
from flexemr.config.cache import LoadMonitorConfig

CONFIG = LoadMonitorConfig(window_s=1.0, enter_high=0.8, exit_high=0.4, min_dwell_s=2.0)


def feed(monitor: LoadMonitor, start: float, end: float, batch: int, queue: int = 0) -> str:
    t = start
    while t < end:
        decision = monitor.observe(batch, queue, t)
        t += 0.1
    return decision.state


def test_enters_high_under_load_and_plans_for_the_largest_batch() -> None:
    monitor = LoadMonitor(CONFIG, 1000, start=0.0)
    assert feed(monitor, 0.0, 3.0, batch=100) == "low"
    decision = monitor.observe(100, 0, 3.0)
    assert decision.plan_batch == 128
    assert feed(monitor, 3.1, 5.0, batch=500, queue=500) == "high"
    assert monitor.observe(500, 500, 5.0).plan_batch == 1000


def test_hysteresis_band_holds_the_state() -> None:
    monitor = LoadMonitor(CONFIG, 1000, start=0.0)
    feed(monitor, 2.0, 4.0, batch=900)
    assert monitor.state == "high"
    assert feed(monitor, 4.0, 9.0, batch=600) == "high"  # 0.6: between exit and enter
    assert feed(monitor, 9.0, 12.0, batch=300) == "low"
    assert feed(monitor, 12.0, 20.0, batch=600) == "low"


def test_minimum_dwell_delays_leaving_a_state() -> None:
    monitor = LoadMonitor(CONFIG, 1000, start=0.0)
    monitor.observe(1000, 0, 5.0)
    assert monitor.state == "high"
    changed_at = None
    t = 5.0
    while changed_at is None:
        t += 0.25
        if monitor.observe(10, 0, t).changed:
            changed_at = t
    assert changed_at >= 7.0  # the window cleared after 1 s, but the dwell holds HIGH for 2 s


def test_plan_never_below_the_batch_about_to_run() -> None:
    monitor = LoadMonitor(CONFIG, 1000, start=0.0)
    assert monitor.observe(10, 0, 0.0).plan_batch == 16
    assert monitor.observe(1500, 0, 0.1).plan_batch == 1500  # larger than max_batch: still planned
    assert monitor.observe(10, 0, 5.0).plan_batch >= 10


def test_window_forgets_old_batches() -> None:
    monitor = LoadMonitor(CONFIG, 1000, start=0.0)
    monitor.observe(200, 0, 0.0)
    assert monitor.observe(10, 0, 0.5).plan_batch == 256
    assert monitor.observe(10, 0, 1.6).plan_batch == 16


def test_bad_input_is_refused() -> None:
    monitor = LoadMonitor(CONFIG, 1000, start=1.0)
    with pytest.raises(ValueError, match="backwards"):
        monitor.observe(1, 0, 0.5)
    with pytest.raises(ValueError, match=">= 0"):
        monitor.observe(-1, 0, 2.0)
    with pytest.raises(ValueError, match="exit_high < enter_high"):
        LoadMonitorConfig(enter_high=0.5, exit_high=0.5)


def test_next_power_of_two() -> None:
    assert [next_power_of_two(n) for n in (0, 1, 2, 3, 64, 65)] == [1, 1, 2, 4, 64, 128]
