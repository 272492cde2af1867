"""Where a py-spy profile's threads spend their busy time (collapsed stacks from `--format raw`).

    .venv/bin/python benchmarks/profile_summary.py /tmp/serving.raw [--top 25]

Per thread: its samples, how many were busy (not waiting in select/epoll/locks/sleep), and the
functions on the stack in the most busy samples (inclusive, as a share of its busy samples). A
profile of several processes (`py-spy --subprocesses`) names each thread after its process too.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict

WAITING = re.compile(
    r"^(?:[\w<>.]+\.)?(select|poll|epoll_wait|wait|acquire|sleep|get|run_forever|_run_once|run|accept|_worker"
    r"|_recv_exact|watch) \("
)
"""Leaf frames that mean the thread is waiting (uvloop waits inside its C `run`, an idle pool
thread in `_worker`, an embedding server's connection thread for the next frame in `_recv_exact`,
a child process for its parent's stdin to close in `watch`)."""
FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^:]*):\d+\)$")
PROCESS = re.compile(r'^process (?P<pid>\d+):"(?P<command>.*)"$')


def process_name(frame: str) -> str:
    """`process PID:"COMMAND"` as the flexemr role it runs (`embedding-server 1`), or its pid."""
    match = PROCESS.match(frame)
    if match is None:
        return frame
    server = re.search(r"embedding-server .*--index (\d+)", match["command"])
    role = f"embedding-server {server[1]}" if server else "ranker" if " serve " in match["command"] else ""
    return f"{role} ({match['pid']})".strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    samples: Counter[str] = Counter()
    busy: Counter[str] = Counter()
    functions: defaultdict[str, Counter[str]] = defaultdict(Counter)
    with open(args.raw) as lines:
        for line in lines:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            while len(frames) > 1 and frames[1].startswith("process "):  # a child's stacks: its own
                frames = frames[1:]
            if frames[0].startswith("process ") and len(frames) > 1:
                frames = [f"{process_name(frames[0])} {frames[1]}", *frames[2:]]
            thread, n = frames[0], int(count)
            samples[thread] += n
            if WAITING.match(frames[-1]):
                continue
            busy[thread] += n
            names = set()
            for frame in frames[1:]:
                match = FRAME.match(frame)
                names.add(f"{match['name']} ({match['file'].rsplit('/', 1)[-1]})" if match else frame)
            for name in names:
                functions[thread][name] += n
    for thread, n in samples.most_common():
        if not busy[thread]:
            continue
        print(f"{thread}: {n} samples, {busy[thread]} busy ({100 * busy[thread] / n:.0f}%)")
        for name, count in functions[thread].most_common(args.top):
            print(f"  {100 * count / busy[thread]:5.1f}%  {name}")


if __name__ == "__main__":
    main()
