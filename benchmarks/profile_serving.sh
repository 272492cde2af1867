#!/bin/bash
# Profile the served monolithic (`flexemr serve --embedding-tier local`) under C=1 load with py-spy
# (pinned in constraints.txt): 20 s of samples of every thread, as collapsed stacks in OUT.raw.
#
#   benchmarks/profile_serving.sh /tmp/serving [extra `flexemr serve` flags, e.g. --http-parser h11]
#   .venv/bin/python benchmarks/profile_summary.py /tmp/serving.raw
#
# flexemr with embedding servers, every process: PYSPY_ARGS=--subprocesses benchmarks/profile_serving.sh
#   /tmp/flexemr --embedding-tier flexemr --embedding-servers 2   (the last --embedding-tier wins)
# PYSPY_IDLE= (empty) keeps on-CPU samples only: a thread blocked in recv_into looks busy otherwise
# (on a loaded machine a runnable thread waiting for a core counts as on-CPU too). PYSPY_RATE: samples/s (200).
set -euo pipefail
out=$1
shift
bin=$(dirname "$0")/../.venv/bin
"$bin/python" -m flexemr.cli.main serve --preset rmc1 --row-scale 0.01 --embedding-tier local \
    --torch-threads 1 --port 0 "$@" >"$out.serve.log" 2>&1 &
serve=$!
trap 'kill -TERM $serve 2>/dev/null; wait $serve' EXIT
for _ in $(seq 1 180); do grep -q "flexemr ready" "$out.serve.log" && break; sleep 1; done
url=$(grep -o "http://[0-9.:]*" "$out.serve.log" | head -1)
"$bin/python" "$(dirname "$0")/serving_overhead.py" --c1-load "$url" --seconds 25 >"$out.load.log" &
load=$!
sleep 3
"$bin/py-spy" record --pid "$serve" --duration 20 --rate ${PYSPY_RATE:-200} --format raw --threads ${PYSPY_IDLE---idle} ${PYSPY_ARGS:-} -o "$out.raw"
wait $load
