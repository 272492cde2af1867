from __future__ import annotations

import pytest
import torch

from flexemr.cache.memory_model import MemoryModel, fit_line, measure_forward_bytes, parameter_bytes
from flexemr.model.dlrm import DenseArch
from flexemr.model.presets import preset


@pytest.fixture(scope="module")
def dense() -> DenseArch:
    return DenseArch(preset("rmc2", row_scale=0.001)).eval()


def test_measured_forward_grows_with_the_batch_and_covers_its_inputs(dense: DenseArch) -> None:
    spec = dense.spec
    sizes = [8, 64, 512]
    peaks = [measure_forward_bytes(dense, b, torch.device("cpu")) for b in sizes]
    assert peaks == sorted(peaks) and peaks[0] < peaks[-1]
    for b, peak in zip(sizes, peaks, strict=True):
        inputs = b * (spec.num_dense + spec.num_tables * spec.dim) * 4
        assert peak > inputs  # inputs plus every layer's output


def test_calibrated_model_is_monotone_and_bounds_the_measurements(dense: DenseArch) -> None:
    model = MemoryModel.calibrate(dense, "cpu", batch_sizes=(16, 128), device_budget_bytes=1 << 30)
    assert model.parameter_bytes == parameter_bytes(dense) > 0
    estimates = [model.activation_bytes(b) for b in (1, 16, 100, 1000, 10_000)]
    assert estimates == sorted(estimates)
    assert model.activation_bytes(128) >= measure_forward_bytes(dense, 128, torch.device("cpu"))


def test_budget_arithmetic_and_never_negative() -> None:
    model = MemoryModel(
        device_budget_bytes=10_000,
        parameter_bytes=1_000,
        fixed_bytes=500,
        per_sample_bytes=10,
        safety_margin_bytes=100,
    )
    assert model.cache_budget(100) == 10_000 - 1_000 - (500 + 1_000) - 100
    budgets = [model.cache_budget(b) for b in (0, 10, 100, 500, 1_000, 10**6)]
    assert budgets == sorted(budgets, reverse=True)
    assert model.cache_budget(10**6) == 0


def test_fit_bounds_noisy_points() -> None:
    fixed, slope = fit_line([1, 2, 3], [10, 30, 20])
    assert slope >= 0 and all(fixed + slope * b >= p for b, p in [(1, 10), (2, 30), (3, 20)])
    assert fit_line([1, 2], [100, 50]) == (100, 0)  # a falling fit is clamped flat


def test_invalid_values_are_refused() -> None:
    with pytest.raises(ValueError, match="parameter_bytes"):
        MemoryModel(device_budget_bytes=1, parameter_bytes=-1, fixed_bytes=0, per_sample_bytes=0)
