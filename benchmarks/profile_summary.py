"""Where a py-spy profile's threads spend their busy time (collapsed stacks from `--format raw`).

    .venv/bin/python benchmarks/profile_summary.py /tmp/serving.raw [--top 25]

Per thread (with `--subprocesses`: per process and thread, `embedding-server --index 0 / thread
(...)`): its samples, how many were busy (not waiting in select/epoll/locks/sleep), and the
functions on the stack in the most busy samples (inclusive, as a share of its busy samples). A
thread blocked in a socket's `recv_into` looks busy in `--idle` samples (the call is C, the leaf
its Python caller): profile the embedding servers' connection threads with on-CPU samples only.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict

WAITING = re.compile(
    r"^(?:\w+\.)?(select|poll|epoll_wait|wait|acquire|sleep|get|run_forever|_run_once|run|accept|_worker) \("
)
"""Leaf frames that mean the thread is waiting (uvloop waits inside its C `run`, an idle pool
thread in `_worker`)."""
FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^:]*):\d+\)$")


def _short(owners: list[str]) -> str:
    """`process 12: "... embedding-server ... --index 0 ..."; thread (34): name` -> `... index 0 / name`."""

    def name(owner: str) -> str:
        if not owner.startswith("process "):
            return owner
        command = re.sub(r'process \d+:"(.*)"', lambda m: m[1].split(" -m flexemr.cli.main ")[-1], owner)
        index = re.search(r" --index \d+", command)
        return command.split()[0] + (index[0] if index else "")

    names = [name(o) for o in owners]
    return " / ".join(names[-2:] if len(names) > 1 else names)


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
            # With --threads (and --subprocesses) the stack opens with its process(es) and thread.
            at = next((i for i, f in enumerate(frames) if f.startswith("thread (")), 0)
            thread, n = _short(frames[: at + 1]), int(count)
            frames = frames[at:]
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
