"""Overlapping requests never split the cores further than torch's thread count allows."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import os, torch
torch.set_num_threads({threads})
from flexemr.ranker.ranker import dense_slots
slots = dense_slots()
held = 0
while slots.acquire(blocking=False):
    held += 1
print(held)
"""


@pytest.mark.parametrize("threads", [1, os.cpu_count() or 1])
def test_dense_forwards_at_once_are_the_cores_over_the_torch_threads(threads: int) -> None:
    held = subprocess.run(
        [sys.executable, "-c", PROBE.format(threads=threads)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert int(held) == max(1, (os.cpu_count() or 1) // threads)
