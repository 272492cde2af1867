"""A network-namespace test bed, or a clean skip saying why there cannot be one."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Sequence

import pytest

from flexemr.entrypoints.netns import NetnsBed, unavailable_reason

FLEXEMR = [sys.executable, "-m", "flexemr.cli.main"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "FLEXEMR_SECRET": secrets.token_hex(32)}
"""Nodes on other hosts listen on non-loopback addresses, which needs the cluster's shared secret."""


def netns_bed(hosts: Sequence[str]) -> NetnsBed:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no multi-host test bed here: {reason}")
    return NetnsBed(hosts)


def start_servers(bed: NetnsBed, spec: str, hosts: Sequence[str]) -> list[subprocess.Popen[bytes]]:
    """Embedding server i of `spec` in namespace `hosts[i]`."""
    return [
        bed.popen(host, [*FLEXEMR, "embedding-server", "--spec", spec, "--index", str(i), "--quiet"], env=ENV)
        for i, host in enumerate(hosts)
    ]
