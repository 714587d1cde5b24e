#!/usr/bin/env bash
# Runs every harness with atheris for RUNS inputs each (default 1,000,000), one after
# the other, logging to fuzz/logs/NAME.log; prints one summary line per harness.
# Usage: fuzz/run_all.sh [RUNS] [NAME...]      (needs atheris: pip install atheris)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RUNS=${1:-1000000}
shift || true
names=("$@")
[ ${#names[@]} -eq 0 ] && mapfile -t names < <($PY -m fuzz.run --list)
mkdir -p fuzz/logs
for n in "${names[@]}"; do
    start=$(date +%s)
    $PY -m fuzz.run "$n" -atheris_runs="$RUNS" -print_final_stats=1 >"fuzz/logs/$n.log" 2>&1
    rc=$?
    end=$(date +%s)
    done_line=$(grep -E "^Done [0-9]+ " "fuzz/logs/$n.log" | tail -1)
    echo "$n: exit $rc, ${done_line:-no Done line}, $((end - start))s"
done
