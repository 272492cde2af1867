"""What moving one lookup subrequest's bytes through loopback TCP costs with next to no Python: the
floor under flexemr's wire on one host.

A client process sends `--request-bytes` (one subrequest: rmc1 x0.01's 86,802 int32 rows and bag
offsets) and reads `--answer-bytes` back (1,080 x 32 float32 partial sums) from a server process,
`--round-trips` times, each side with one `sendall` and `recv_into(..., MSG_WAITALL)` calls on
blocking sockets with TCP_NODELAY; prints each side's CPU per round trip. Where the two processes
run matters: on an idle 2-core VM, across the cores, waking the other vCPU and moving the bytes
between the cores' caches cost 4-5x what the same round trips cost on one core.

    .venv/bin/python benchmarks/loopback_floor.py
    taskset -c 0 .venv/bin/python benchmarks/loopback_floor.py   (both on one core)
"""

from __future__ import annotations

import argparse
import os
import socket
import time
import traceback


def receive(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], len(view) - got, socket.MSG_WAITALL)
        if not n:
            raise ConnectionError("peer closed")
        got += n


def serve(listener: socket.socket, args: argparse.Namespace) -> None:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request, answer = memoryview(bytearray(args.request_bytes)), bytes(args.answer_bytes)
    start = time.process_time()
    for _ in range(args.round_trips):
        receive(conn, request)
        conn.sendall(answer)
    print(f"server: {(time.process_time() - start) / args.round_trips * 1e6:.0f} us of CPU per round trip")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--request-bytes", type=int, default=351_576)
    parser.add_argument("--answer-bytes", type=int, default=138_276)
    parser.add_argument("--round-trips", type=int, default=5000)
    args = parser.parse_args()
    listener = socket.create_server(("127.0.0.1", 0))
    server = os.fork()
    if server == 0:  # the child answers, then leaves without running the parent's cleanup
        code = 0
        try:
            serve(listener, args)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    sock = socket.create_connection(listener.getsockname())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request, answer = bytes(args.request_bytes), memoryview(bytearray(args.answer_bytes))
    start, wall = time.process_time(), time.perf_counter()
    for _ in range(args.round_trips):
        sock.sendall(request)
        receive(sock, answer)
    cpu, elapsed = time.process_time() - start, time.perf_counter() - wall
    if os.waitstatus_to_exitcode(os.waitpid(server, 0)[1]):
        raise SystemExit("the answering process failed")
    print(f"client: {cpu / args.round_trips * 1e6:.0f} us of CPU per round trip, "
          f"{elapsed / args.round_trips * 1e6:.0f} us each")  # fmt: skip


if __name__ == "__main__":
    main()
