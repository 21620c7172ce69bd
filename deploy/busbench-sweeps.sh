#!/usr/bin/env bash
# The standard busbench sweeps for a machine, as JSON, plots, reports and tables in OUTDIR.
#   deploy/busbench-sweeps.sh OUTDIR [COUNTS]     COUNTS default: 1,2,5,10,20
# On a 16-core machine: deploy/busbench-sweeps.sh sweep-16 1,2,5,10,16,20
# Environment:
#   SWEEPS   which sweeps, in order [explorer-lockstep explorer-async null-lockstep]
#            (also: explorer-jax, JAX backend, lock-step; and each with -hosts appended,
#            e.g. explorer-lockstep-hosts: the same agents in agent hosts, --per-host auto)
#   REPEAT   repeats per count, medians reported [3]
#   BUSBENCH_DURATION and any other BUSBENCH_* variable reach every busbench run.
# Compare with an earlier OUTDIR: busbench ... --baseline OLD/explorer-lockstep.json
set -euo pipefail
out=${1:?usage: busbench-sweeps.sh OUTDIR [COUNTS]}
counts=${2:-1,2,5,10,20}
repeat=${REPEAT:-3}
mkdir -p "$out"
run() {  # name, then busbench options
    local name=$1; shift
    busbench --sweep "$counts" --repeat "$repeat" "$@" --format json --output "$out/$name.json" \
        --plot "$out/$name.png" --report "$out/$name.md"
    python3 -c "import json, sys; from agentbus_zmq.busbench.report import table; print(table(json.load(open(sys.argv[1]))))" \
        "$out/$name.json" | tee "$out/$name.txt"
}
for sweep in ${SWEEPS:-explorer-lockstep explorer-async null-lockstep}; do
    hosts=()
    [[ $sweep == *-hosts ]] && hosts=(--per-host auto)
    case ${sweep%-hosts} in
        explorer-lockstep) run "$sweep" "${hosts[@]}" ;;
        explorer-async) run "$sweep" --mode async "${hosts[@]}" ;;
        null-lockstep) run "$sweep" --agent-kind null "${hosts[@]}" ;;
        explorer-jax) run "$sweep" --backend jax "${hosts[@]}" ;;
        *) echo "busbench-sweeps.sh: unknown sweep '$sweep'" >&2; exit 2 ;;
    esac
done
echo "results in $out/"
