"""CPU time from /proc, for the benchmarks: of a process, of its threads, of it and every process
below it (a local cluster's embedding servers), and of the whole host."""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def stat_user_system_s(stat: Path) -> tuple[float, float]:
    """CPU seconds in user and in system (kernel) mode from a process's or a thread's stat file."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def user_system_s(pid: int | None) -> tuple[float, float]:
    """CPU seconds in user and in system mode process `pid` has used (NaN without a process)."""
    if pid is None:
        return float("nan"), float("nan")
    return stat_user_system_s(Path(f"/proc/{pid}/stat"))


def cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) process `pid` has used."""
    return sum(user_system_s(pid))


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of process `pid`, by thread id."""
    cpu = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            cpu[int(task.name)] = sum(stat_user_system_s(task / "stat"))
        except OSError:  # the thread ended
            continue
    return cpu


def children(pid: int) -> list[int]:
    """The processes `pid` started, from any of its threads (a supervisor restarts servers)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # the thread ended
            continue
    return found


def tree_cpu_s(pid: int | None) -> float:
    """CPU seconds process `pid` and its descendants (a local cluster's embedding servers) used."""
    if pid is None:
        return float("nan")
    return cpu_s(pid) + sum(tree_cpu_s(child) for child in children(pid))


def host_cpu_s() -> tuple[float, float]:
    """CPU seconds the whole host has been busy (not idle nor waiting for I/O), and in all. Guest
    time is already in user time: only the first eight columns count."""
    jiffies = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = jiffies[3] + jiffies[4]
    return (sum(jiffies) - idle) / TICKS, sum(jiffies) / TICKS
