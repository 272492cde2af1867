"""The namespace test bed: hosts reach each other over their links only, links get shaped, and
everything (namespaces, processes inside) is gone after close, even when the body failed."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from flexemr.entrypoints.netns import NetnsBed, parse_rate
from tests.entrypoints.helpers import netns_bed

ECHO = (
    "import socket, time; s = socket.create_server(('{}', 9000)); c, _ = s.accept(); "
    "c.sendall(c.recv(5)); time.sleep(600)"
)


def test_parse_rate() -> None:
    assert parse_rate("10gbit") == 10**10
    assert parse_rate("1.5mbit") == 1_500_000
    with pytest.raises(ValueError, match="like 10gbit"):
        parse_rate("10 GB/s")


def _echo_then_fail(bed: NetnsBed, started: list[subprocess.Popen[bytes]]) -> None:
    with bed:
        started.append(bed.popen("a", [sys.executable, "-c", ECHO.format(bed.addresses["a"])]))
        bed.shape("a", "1gbit")
        shown = subprocess.run(
            bed.command("a", ["tc", "qdisc", "show", "dev", "eth0"]),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "tbf" in shown and "rate 1Gbit" in shown
        with bed.entered("b"):
            for _ in range(100):  # the server may still be starting
                try:
                    conn = socket.create_connection((bed.addresses["a"], 9000), timeout=5)
                    break
                except ConnectionRefusedError:
                    time.sleep(0.1)
            with conn:
                conn.sendall(b"hello")
                assert conn.recv(5) == b"hello"
        assert bed.pids("a") == [started[0].pid]
        raise RuntimeError("body failed")


def test_hosts_talk_over_shaped_links_and_nothing_outlives_the_bed() -> None:
    bed = netns_bed(["a", "b"])
    namespaces = list(bed.namespaces.values())
    started: list[subprocess.Popen[bytes]] = []
    with pytest.raises(RuntimeError, match="body failed"):
        _echo_then_fail(bed, started)
    assert started[0].wait(10) == -9  # killed by close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not any(ns in listed for ns in namespaces)
