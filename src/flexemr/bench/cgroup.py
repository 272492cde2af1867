"""A memory-limited cgroup v2 for a benchmark's or a test's server process, where the host allows it.

Needs root and a cgroup v2 hierarchy with the memory controller. On hosts with cgroup v1 only (or
no right to create groups) `memory_cgroup` returns None and callers skip the limited run.
RLIMIT_AS would be no substitute: it limits address space, and a memory-mapped file takes address
space the size of the file however little of it is resident.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))


@contextlib.contextmanager
def memory_cgroup(max_bytes: int) -> Iterator[Path | None]:
    """A new cgroup whose `memory.max` is `max_bytes` (None where none can be made); removed after."""
    group = None
    for root in _ROOTS:
        try:
            if "memory" not in (root / "cgroup.controllers").read_text().split():
                continue
            (root / "cgroup.subtree_control").write_text("+memory")
            group = root / f"flexemr-{os.getpid()}"
            group.mkdir()
            (group / "memory.max").write_text(str(max_bytes))
            break
        except OSError:
            group = None
    try:
        yield group
    finally:
        if group is not None:
            for pid in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (group.parent / "cgroup.procs").write_text(pid)
            group.rmdir()
