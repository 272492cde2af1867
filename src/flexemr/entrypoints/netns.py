"""Several hosts on one machine: Linux network namespaces joined by a switch, for tests and benchmarks.

Each host is a namespace with one veth interface; its peer sits on a bridge in a switch namespace of
the bed's own, so hosts talk only over their links (never over a shared loopback) and nothing is
added to the machine's own namespace. Links can be rate-limited with `tc tbf` on both ends.

    fx<id>-mem0   eth0 10.213.0.1 ─veth─ p0 ┐
    fx<id>-mem1   eth0 10.213.0.2 ─veth─ p1 ├─ br0 in fx<id>-sw
    fx<id>-rank   eth0 10.213.0.3 ─veth─ p2 ┘

Names carry a random id, so beds of parallel runs never collide; the addresses exist only inside the
bed's namespaces. `close()` kills every process left in them and deletes them, whatever happened.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from types import TracebackType

SUBNET = "10.213.0"
CLONE_NEWNET = 0x40000000
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no iproute2, or a sandbox forbids them)."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {done.stderr.strip()}")


def unavailable_reason() -> str | None:
    """Why a bed cannot be made on this machine, or None when it can (probes with a namespace)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "network namespaces need iproute2 (`ip`, `tc`)"
    probe = f"fxprobe-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except NetnsUnavailable as exc:
        return f"cannot create a network namespace: {exc}"
    _ip("netns", "del", probe)
    return None


def parse_rate(rate: str) -> int:
    """`10gbit`, `1gbit`, `500mbit` -> bits per second (tc's units)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?bit)", rate.strip().lower())
    if match is None:
        raise ValueError(f"rate {rate!r} is not like 10gbit, 1gbit or 500mbit")
    return int(float(match.group(1)) * _RATE_UNITS[match.group(2)])


class NetnsBed:
    """Hosts (network namespaces) on one switch; run processes in them, shape their links."""

    def __init__(self, hosts: Sequence[str]) -> None:
        if len(set(hosts)) != len(hosts) or not 0 < len(hosts) < 250:
            raise ValueError(f"need 1..249 distinct host names, got {list(hosts)}")
        reason = unavailable_reason()
        if reason is not None:
            raise NetnsUnavailable(reason)
        self.id = secrets.token_hex(3)
        self.switch = f"fx{self.id}-sw"
        self.namespaces = {h: f"fx{self.id}-{h}"[:32] for h in hosts}
        self.addresses = {h: f"{SUBNET}.{i + 1}" for i, h in enumerate(hosts)}
        self._ports = {h: f"p{i}" for i, h in enumerate(hosts)}
        self._made: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        self._add_namespace(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for host, ns in self.namespaces.items():
            self._add_namespace(ns)
            port = self._ports[host]
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.addresses[host]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            # Software that finds its own address by a route (Ray does) sees eth0's; the switch
            # has no uplink, so nothing sent this way can leave the bed.
            _ip("-n", ns, "route", "add", "default", "dev", "eth0")

    def _add_namespace(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)

    # -- links ------------------------------------------------------------------------------------------

    def shape(self, host: str, rate: str) -> None:
        """Limit `host`'s link to `rate` each way (tbf on its interface and on its switch port)."""
        bits = parse_rate(rate)
        # The bucket must hold a veth's largest (GSO) packet and a few ms of traffic at the rate.
        burst = max(256 * 1024, bits // 8 // 250)
        for ns, dev in ((self.namespaces[host], "eth0"), (self.switch, self._ports[host])):
            done = subprocess.run(
                ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                 "rate", f"{bits}bit", "burst", str(burst), "latency", "100ms"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                raise NetnsUnavailable(f"tc tbf on {ns}/{dev}: {done.stderr.strip()}")

    def delay_supported(self) -> bool:
        """Whether this kernel has `netem` (added delay); many sandboxes and slim kernels lack it."""
        ns = self.namespaces[next(iter(self.namespaces))]
        add = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]
        if subprocess.run(add, capture_output=True, check=False).returncode != 0:
            return False
        subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "lo", "root"], check=False)
        return True

    # -- processes --------------------------------------------------------------------------------------

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """`argv` run inside `host` (`ip netns exec` execs it: the pid is the command's own)."""
        return ["ip", "netns", "exec", self.namespaces[host], *argv]

    def popen(self, host: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start `argv` in `host`; `close()` kills and reaps it if it still runs then."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(self.command(host, argv), **kwargs)  # type: ignore[call-overload]
        self._procs.append(proc)
        return proc

    @contextlib.contextmanager
    def entered(self, host: str) -> Iterator[None]:
        """Run this thread inside `host` (sockets made meanwhile stay there): the test's own client."""
        libc = ctypes.CDLL(None, use_errno=True)
        with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{self.namespaces[host]}") as there:
            if libc.setns(there.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {host}")
            try:
                yield
            finally:
                if libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back home")

    def pids(self, host: str) -> list[int]:
        done = subprocess.run(
            ["ip", "netns", "pids", self.namespaces[host]], capture_output=True, text=True, check=False
        )
        return [int(p) for p in done.stdout.split()]

    def kill_host(self, host: str) -> None:
        """SIGKILL every process in `host` (a machine that died)."""
        for pid in self.pids(host):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        """Kill what runs in the bed, then delete its namespaces (their links go with them)."""
        for host, ns in self.namespaces.items():
            if ns in self._made:
                self.kill_host(host)
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self._procs.clear()
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self._made.clear()

    def __enter__(self) -> NetnsBed:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
