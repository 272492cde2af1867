"""Small factories for core tests: random valid batches and the monolithic reference."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from flexemr.model.dlrm import DLRM
from flexemr.model.spec import ModelSpec

NEEDS_REDIS_SERVER = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="needs Debian's redis-server: `make test` installs it when run as root (else: apt-get install "
    "redis-server)",
)
"""For tests of the Redis baselines, which start a throwaway redis-server."""


def random_batch(
    spec: ModelSpec, batch: int, seed: int, max_bag: int = 4, empty_tables: tuple[int, ...] = ()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dense, indices, lengths in the KJT layout, with some empty bags."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_bag + 1, size=(spec.num_tables, batch)).astype(np.int32)
    lengths[list(empty_tables)] = 0
    per_table = lengths.sum(axis=1)
    indices = np.concatenate(
        [rng.integers(0, rows, size=n) for rows, n in zip(spec.table_rows, per_table, strict=True)]
    ).astype(np.int64)
    dense = rng.standard_normal((batch, spec.num_dense)).astype(np.float32)
    return dense, indices, lengths.reshape(-1)


def reference_scores(model: DLRM, dense: np.ndarray, indices: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model.forward_sparse(
            torch.from_numpy(dense), torch.from_numpy(indices), torch.from_numpy(lengths)
        )
    return out.numpy()


def assert_scores_like_the_monolith(
    score: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], model: DLRM, seeds: int = 3
) -> None:
    """`score` (a ranker's, a client's) gives the monolithic model's scores on random batches of 32."""
    for seed in range(seeds):
        dense, indices, lengths = random_batch(model.spec, 32, seed)
        np.testing.assert_allclose(
            score(dense, indices, lengths),
            reference_scores(model, dense, indices, lengths),
            rtol=1e-4,
            atol=1e-5,
        )


def wait_for_cached_rows(stats: Callable[[], dict[str, object]], timeout: float = 30) -> None:
    """Return once the ranker's cache (`stats`: `Ranker.stats`) holds rows: its background warmer
    admits them after the requests that observed them, later on a busy machine."""
    deadline = time.monotonic() + timeout
    while not stats()["cache"]["rows"]:  # type: ignore[index]
        assert time.monotonic() < deadline, f"the cache admitted no row within {timeout} s"
        time.sleep(0.02)


def freeze(pid: int, timeout: float = 30) -> None:
    """SIGSTOP `pid` and return once every one of its threads is stopped. `kill` returns before
    that: the signal stops one thread, which then stops the others, and on a busy machine another
    thread may still run (and answer a request) for a while."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    tasks = Path(f"/proc/{pid}/task")
    while not all(_state(stat) == "T" for stat in tasks.glob("*/stat")):
        assert time.monotonic() < deadline, f"process {pid} did not stop within {timeout} s"
        time.sleep(0.01)


def _state(stat: Path) -> str:
    try:
        return stat.read_text().rpartition(")")[2].split()[0]  # the field after the command name
    except FileNotFoundError:
        return "T"  # the thread has exited
