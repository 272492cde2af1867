"""What queueing alone makes of the tail: p99 / p50 of the response time under Poisson arrivals,
for a server of fixed service time with 1, 2 or 4 lanes (requests served side by side), and for one
lane that merges every waiting request into its next batch (a batch of k costs `fixed + (1 - fixed)
* k` service times). No system is run: it is the bound a design starts from.

    .venv/bin/python benchmarks/queueing_tail.py [--loads 25,50,75] [--arrivals 200000]

At 50% of capacity one lane gives p99 ~4.3x p50 however lean each request is: #22's 2.5x needs
requests served side by side (two lanes: ~2.5x) or batches much cheaper than their parts.
"""

from __future__ import annotations

import argparse
import heapq

import numpy as np


def lanes(arrivals: np.ndarray, count: int) -> np.ndarray:
    """Response times with `count` lanes of service time 1, first come first served."""
    free = [0.0] * count
    done = np.empty_like(arrivals)
    for i, arrival in enumerate(arrivals):
        done[i] = max(arrival, heapq.heappop(free)) + 1.0
        heapq.heappush(free, done[i])
    response: np.ndarray = done - arrivals
    return response


def merged(arrivals: np.ndarray, fixed: float) -> np.ndarray:
    """Response times with one lane that takes every request waiting when it frees as one batch."""
    done = np.empty_like(arrivals)
    free, i = 0.0, 0
    while i < len(arrivals):
        start = max(arrivals[i], free)
        last = max(int(np.searchsorted(arrivals, start, side="right")), i + 1)
        free = start + fixed + (1 - fixed) * (last - i)
        done[i:last] = free
        i = last
    response: np.ndarray = done - arrivals
    return response


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", default="25,50,75", help="%% of the capacity")
    parser.add_argument("--arrivals", type=int, default=200_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    designs: list[tuple[str, int, float | None]] = [(f"{c} lane{'s' * (c > 1)}", c, None) for c in (1, 2, 4)]
    designs += [(f"1 lane, batches merged ({f:.0%} of a request fixed)", 1, f) for f in (0.2, 0.5)]
    loads = [float(k) / 100 for k in args.loads.split(",")]
    print("| design | " + " | ".join(f"p50 / p99 (x p50) at {k:.0%}" for k in loads) + " |")
    print("|---|" + "---:|" * len(loads))
    for name, count, fixed in designs:
        cells = []
        for load in loads:
            gaps = rng.exponential(1 / (load * count), args.arrivals)
            arrivals = np.cumsum(gaps)
            times = lanes(arrivals, count) if fixed is None else merged(arrivals, fixed)
            p50, p99 = np.percentile(times, [50, 99])
            cells.append(f"{p50:.2f} / {p99:.2f} ({p99 / p50:.1f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nTimes in service times (the lanes' capacity is `lanes` requests per service time).")


if __name__ == "__main__":
    main()
