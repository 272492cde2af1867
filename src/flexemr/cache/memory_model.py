"""How much memory the dense network needs at a batch size, and so how much is left for the cache.

    cache_budget(B) = max(0, device_budget - parameter_bytes - activations(B) - safety_margin)
    activations(B)  = fixed + per_sample * B          (fitted, then raised to bound every measurement)
                      + request_per_sample * B        (the ranker's batch buffers outside the forward)

Calibration runs the dense forward (inference, `torch.no_grad()`) at a few batch sizes on the
serving device and measures the memory it takes:

- CUDA: exact peak, `torch.cuda.max_memory_allocated` minus what was allocated before.
- CPU: torch's CPU allocator keeps no peak counter, and tracemalloc does not see torch. A
  dispatch mode sees every op's output instead; it adds up the bytes of every new storage made
  during the forward (inputs included) and keeps them alive until the forward ends, so freed
  memory is never reused and counted twice or missed. That total is what the forward would need
  if nothing were ever freed: an upper bound of its peak, hence a safe (somewhat pessimistic)
  estimate. For DLRM-style MLPs it is within a small factor of the true peak.

The fit is a line through the measurements by least squares (slope and intercept clamped at 0, so
the estimate is monotone in B), shifted up until no measurement lies above it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from flexemr.model.dlrm import DenseArch
from flexemr.model.spec import ModelSpec

CPU_BUDGET_FRACTION = 0.25
"""On CPU, the default device budget is this fraction of physical RAM."""
GPU_BUDGET_FRACTION = 0.9
"""On a GPU, the default device budget is this fraction of (free + held by this process)."""
CALIBRATION_BATCHES = (64, 256, 1024)


@dataclass(frozen=True)
class MemoryModel:
    device_budget_bytes: int
    """All the memory the ranker may use on its device: parameters, activations and cache."""
    parameter_bytes: int
    """The dense network's parameters and buffers."""
    fixed_bytes: int
    """Activation bytes independent of the batch size (from the fit)."""
    per_sample_bytes: int
    """Activation bytes per sample: the fitted slope plus the request buffers per sample."""
    safety_margin_bytes: int = 0
    """Held back for fragmentation and anything not modelled."""

    def __post_init__(self) -> None:
        for name in ("device_budget_bytes", "parameter_bytes", "fixed_bytes", "per_sample_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.safety_margin_bytes < 0:
            raise ValueError(f"safety_margin_bytes must be >= 0, got {self.safety_margin_bytes}")

    def activation_bytes(self, batch_size: int) -> int:
        """Memory one batch of `batch_size` samples needs while it runs (inputs included)."""
        return self.fixed_bytes + self.per_sample_bytes * max(batch_size, 0)

    def cache_budget(self, batch_size: int) -> int:
        """Bytes left for the cache while batches of `batch_size` run; never negative."""
        used = self.parameter_bytes + self.activation_bytes(batch_size) + self.safety_margin_bytes
        return max(0, self.device_budget_bytes - used)

    @classmethod
    def calibrate(
        cls,
        dense: DenseArch,
        device: torch.device | str | None = None,
        batch_sizes: Sequence[int] = CALIBRATION_BATCHES,
        device_budget_bytes: int | None = None,
        safety_margin_bytes: int = 64 << 20,
        request_per_sample_bytes: int | None = None,
    ) -> MemoryModel:
        """Measure `dense` (already on `device`, default: where its parameters are) at
        `batch_sizes` and fit. `request_per_sample_bytes` defaults to
        `request_bytes_per_sample(dense.spec)`."""
        device = torch.device(device) if device is not None else _module_device(dense)
        if len(batch_sizes) < 2 or min(batch_sizes) < 1:
            raise ValueError(f"need at least two positive calibration batch sizes, got {batch_sizes}")
        peaks = [measure_forward_bytes(dense, b, device) for b in batch_sizes]
        fixed, slope = fit_line(batch_sizes, peaks)
        if request_per_sample_bytes is None:
            request_per_sample_bytes = request_bytes_per_sample(dense.spec)
        return cls(
            device_budget_bytes=default_device_budget(device)
            if device_budget_bytes is None
            else device_budget_bytes,
            parameter_bytes=parameter_bytes(dense),
            fixed_bytes=fixed,
            per_sample_bytes=slope + request_per_sample_bytes,
            safety_margin_bytes=safety_margin_bytes,
        )


def fit_line(batch_sizes: Sequence[int], peaks: Sequence[int]) -> tuple[int, int]:
    """(fixed, per_sample) of a least-squares line, clamped non-negative and raised so that
    fixed + per_sample * b >= peak for every measurement."""
    x = np.asarray(batch_sizes, dtype=np.float64)
    y = np.asarray(peaks, dtype=np.float64)
    slope = max(float(np.polyfit(x, y, 1)[0]), 0.0)
    intercept = max(float(np.max(y - slope * x)), 0.0)  # the lowest line of that slope above all
    return math.ceil(intercept), math.ceil(slope)


def request_bytes_per_sample(spec: ModelSpec) -> int:
    """The ranker's per-sample batch buffers outside the dense forward: a second [T, D] float32
    (the cache's sums or the servers' partials) and, per index, its row, key, bag id (int64 each)
    and hit flag."""
    return spec.num_tables * spec.dim * 4 + sum(spec.bag_sizes) * (3 * 8 + 1)


def parameter_bytes(module: nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def default_device_budget(device: torch.device) -> int:
    """GPU: 90% of (free + what this process's allocator holds). CPU: 25% of physical RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int((free + torch.cuda.memory_reserved(device)) * GPU_BUDGET_FRACTION)
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * CPU_BUDGET_FRACTION)


def measure_forward_bytes(dense: DenseArch, batch_size: int, device: torch.device) -> int:
    """Memory one inference forward of `batch_size` random samples takes, inputs included (see the
    module docstring for how, per device)."""
    spec = dense.spec

    def run() -> None:
        dense_in = torch.randn(batch_size, spec.num_dense, device=device)
        pooled = torch.randn(batch_size, spec.num_tables, spec.dim, device=device)
        dense(dense_in, pooled)

    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            run()
            torch.cuda.synchronize(device)
            return int(torch.cuda.max_memory_allocated(device) - before)
        counter = _AllocationCounter(dense)
        with counter:
            run()
        return counter.bytes


class _AllocationCounter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Sums the bytes of every storage created while active, keeping each alive until exit."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.bytes: int = 0
        self._seen = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
        self._alive: list[Tensor] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, Tensor):
                storage = leaf.untyped_storage()
                if storage.data_ptr() not in self._seen:
                    self._seen.add(storage.data_ptr())
                    self.bytes += int(storage.nbytes())
                    self._alive.append(leaf)
        return out

    def __exit__(self, *args: Any) -> None:
        super().__exit__(*args)  # type: ignore[no-untyped-call]
        self._alive.clear()


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
