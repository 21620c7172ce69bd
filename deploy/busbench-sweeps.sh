#!/usr/bin/env bash
# The standard busbench sweeps for a machine: explorer (numpy) lock-step and async, and
# null agents, each a median of 3, as JSON, plots and a report in OUTDIR.
#   deploy/busbench-sweeps.sh OUTDIR [COUNTS]     COUNTS default: 1,2,5,10,20
# On a 16-core machine: deploy/busbench-sweeps.sh sweep-16 1,2,5,10,16,20
# Compare with an earlier OUTDIR: busbench ... --baseline OLD/explorer-lockstep.json
set -euo pipefail
out=${1:?usage: busbench-sweeps.sh OUTDIR [COUNTS]}
counts=${2:-1,2,5,10,20}
mkdir -p "$out"
run() {  # name, then busbench options
    local name=$1; shift
    busbench --sweep "$counts" --repeat 3 "$@" --format json --output "$out/$name.json" \
        --plot "$out/$name.png" --report "$out/$name.md"
    python3 -c "import json, sys; from bus.bench.report import table; print(table(json.load(open(sys.argv[1]))))" \
        "$out/$name.json" | tee "$out/$name.txt"
}
run explorer-lockstep
run explorer-async --mode async
run null-lockstep --agent-kind null
echo "results in $out/"
