"""What a process may still allocate, checked before it loads rows.

Available memory is the kernel's estimate (`MemAvailable`), capped by the limit of the process's
memory cgroup where it has one (v2 `memory.max` less `memory.current`, v1 `memory.limit_in_bytes`
less `memory.usage_in_bytes`): in a container the cgroup is what the OOM killer enforces. A process
that would not fit refuses at once with the numbers and the flags that change them, instead of
dying mid-load with an OOM traceback. `FLEXEMR_MEMORY_CHECK=off` skips it (for overcommitted hosts
that know better).
"""

from __future__ import annotations

import os
from pathlib import Path

OVERHEAD_BYTES = 64 << 20
"""Allowance over the estimate: frame buffers, thread stacks, allocator slack."""

_CGROUP_ROOT = Path("/sys/fs/cgroup")


class NotEnoughMemory(RuntimeError):
    pass


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cgroup_room() -> int | None:
    """Limit less usage of this process's memory cgroup: v2 `memory.max - memory.current`, or v1
    `memory.limit_in_bytes - memory.usage_in_bytes` (None: no limit, or no memory cgroup)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            group, names = _CGROUP_ROOT / path.lstrip("/"), ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            group, names = (
                _CGROUP_ROOT / "memory" / path.lstrip("/"),
                ("memory.limit_in_bytes", "memory.usage_in_bytes"),
            )
        else:
            continue
        try:
            limit = (group / names[0]).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:  # v1 says "no limit" with a huge number
                return int(limit) - int((group / names[1]).read_text())
        except (OSError, ValueError):
            continue
    return None


def available_bytes() -> int | None:
    """What this process may still allocate (None: unknown)."""
    known = [b for b in (_meminfo_available(), cgroup_room()) if b is not None]
    return min(known) if known else None


def check_memory(need: int, what: str, advice: str) -> None:
    """Refuse (NotEnoughMemory) when `need` bytes plus the overhead exceed what is available."""
    if os.environ.get("FLEXEMR_MEMORY_CHECK") == "off":
        return
    have = available_bytes()
    if have is not None and need + OVERHEAD_BYTES > have:
        raise NotEnoughMemory(
            f"{what} needs {need / 2**30:.2f} GiB (+{OVERHEAD_BYTES >> 20} MiB overhead) but only "
            f"{have / 2**30:.2f} GiB is available (MemAvailable, the memory cgroup's limit); {advice} "
            "(FLEXEMR_MEMORY_CHECK=off skips this check)"
        )


SERVING_ADVICE = (
    "lower --row-scale, store rows as --row-dtype fp16, int8 or int4, add --embedding-servers on other "
    "hosts, or keep rows on SSD with --storage mmap --storage-dir DIR"
)
