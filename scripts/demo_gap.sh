#!/usr/bin/env bash
# The demo's domain gap, as recorded in BENCHMARKS.md: source-only vs oracle (trained on target labels),
# default budget, 3 training seeds each. Prints one line per run and the means.
# usage: scripts/demo_gap.sh [extra rtda-train overrides]
set -euo pipefail
seeds=(1 2 3)
declare -A sum
for exp in demo_source_only demo_oracle; do
  sum[$exp]=0
  for seed in "${seeds[@]}"; do
    start=$(date +%s)
    out=$(rtda-train experiment=$exp seed=$seed "$@" 2>&1) || { echo "$out" | tail -20; exit 1; }
    secs=$(( $(date +%s) - start ))
    dir=$(echo "$out" | sed -n 's/^run folder: //p')
    miou=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['test/mIoU'])" "$dir/results.json")
    echo "$exp seed=$seed test/mIoU=$miou wall=${secs}s ($dir)"
    sum[$exp]=$(python -c "print(${sum[$exp]} + $miou)")
  done
done
for exp in demo_source_only demo_oracle; do
  python -c "print('mean $exp: %.2f mIoU' % (100 * ${sum[$exp]} / ${#seeds[@]}))"
done
