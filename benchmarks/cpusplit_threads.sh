#!/bin/bash
# CPU per request of a served system at C=1, split by thread: the event loop (the main thread) and
# the rest (the scoring threads), user and sys, from /proc/<pid>/task/*/stat. Run from a worktree root.
#
#   benchmarks/cpusplit_threads.sh LABEL --embedding-tier local      (any `flexemr serve` flags)
#
# rmc1 x0.01, 1 torch thread, the C=1 load of serving_overhead.py (270 pairs): 3 s of warm-up, then
# SECONDS_LOAD (10) s measured. A/B: run it in two worktrees in turn, several rounds, medians.
set -euo pipefail
label=$1
shift
bin=${BIN:-.venv/bin}
log=$(mktemp)
"$bin/python" -m flexemr.cli.main serve --preset rmc1 --row-scale 0.01 --torch-threads 1 --port 0 "$@" >"$log" 2>&1 &
serve=$!
trap 'kill -TERM $serve 2>/dev/null; wait $serve; rm -f "$log" "$log".*' EXIT
for _ in $(seq 1 180); do grep -q "flexemr ready" "$log" && break; sleep 1; done
url=$(grep -o "http://[0-9.:]*" "$log" | head -1)
"$bin/python" benchmarks/serving_overhead.py --c1-load "$url" --seconds 3 >/dev/null
snap() {
    for task in /proc/$serve/task/*; do
        awk -v t="${task##*/}" -v m=$serve '{print t, (t == m ? "loop" : "other"), $14, $15}' "$task/stat"
    done | sort
}
snap >"$log.before"
"$bin/python" benchmarks/serving_overhead.py --c1-load "$url" --seconds "${SECONDS_LOAD:-10}" >"$log.load"
snap >"$log.after"
n=$(awk '{print $1}' "$log.load")
# Threads that started during the load count from zero (clock ticks: 100 per second).
join -a 2 -e 0 -o 2.1,2.2,1.3,1.4,2.3,2.4 "$log.before" "$log.after" | awk -v n="$n" -v l="$label" '
    {u[$2] += $5 - $3; s[$2] += $6 - $4}
    END {printf "%s loop user %.3f sys %.3f | other user %.3f sys %.3f | total user %.3f sys %.3f ms/req (%d req)\n",
         l, u["loop"] * 10 / n, s["loop"] * 10 / n, u["other"] * 10 / n, s["other"] * 10 / n,
         (u["loop"] + u["other"]) * 10 / n, (s["loop"] + s["other"]) * 10 / n, n}'
