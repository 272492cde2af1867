"""A memory-limited cgroup for a benchmark's or a test's server process, where the host allows it.

Needs root and the memory controller, on either hierarchy:

    v2  /sys/fs/cgroup[/unified]/<new>        memory.max,            memory.events: oom_kill N
    v1  /sys/fs/cgroup/memory/<ours>/<new>    memory.limit_in_bytes, memory.oom_control: oom_kill N

The v1 group is made inside this process's own memory cgroup (hierarchical: the limits above it
still hold, and nothing moves out of them). Where neither can be made `memory_cgroup` yields None
and callers skip the limited run. Either way a process joins by writing its pid to `cgroup.procs`.
RLIMIT_AS would be no substitute: it limits address space, and a memory-mapped file takes address
space the size of the file however little of it is resident.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

_V2_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
_V1_ROOT = Path("/sys/fs/cgroup/memory")


def _v2_group(name: str, max_bytes: int) -> Path | None:
    for root in _V2_ROOTS:
        try:
            if "memory" not in (root / "cgroup.controllers").read_text().split():
                continue
            (root / "cgroup.subtree_control").write_text("+memory")
            group = root / name
            group.mkdir()
        except OSError:
            continue
        try:
            (group / "memory.max").write_text(str(max_bytes))
        except OSError:
            group.rmdir()
            continue
        return group
    return None


def _v1_group(name: str, max_bytes: int) -> Path | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        ours = next(p for _, c, p in (line.split(":", 2) for line in lines) if "memory" in c.split(","))
        group = _V1_ROOT / ours.lstrip("/") / name
        group.mkdir()
    except (OSError, StopIteration):
        return None
    try:
        (group / "memory.limit_in_bytes").write_text(str(max_bytes))
    except OSError:
        group.rmdir()
        return None
    return group


@contextlib.contextmanager
def memory_cgroup(max_bytes: int) -> Iterator[Path | None]:
    """A new cgroup whose memory limit is `max_bytes` (None where none can be made); its processes
    are moved back to the parent and the group removed after."""
    name = f"flexemr-{os.getpid()}"
    group = _v2_group(name, max_bytes) or _v1_group(name, max_bytes)
    try:
        yield group
    finally:
        if group is not None:
            for pid in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (group.parent / "cgroup.procs").write_text(pid)
            group.rmdir()


def oom_kills(group: Path) -> int:
    """Processes of `group` the kernel's OOM killer has killed (v2 `memory.events`, v1
    `memory.oom_control`)."""
    for name in ("memory.events", "memory.oom_control"):
        with contextlib.suppress(FileNotFoundError):
            fields = (group / name).read_text().split()
            return int(fields[fields.index("oom_kill") + 1])
    raise FileNotFoundError(f"{group} has neither memory.events nor memory.oom_control")
