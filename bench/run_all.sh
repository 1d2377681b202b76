#!/usr/bin/env bash
# Every benchmark in turn (nothing else should run on the machine meanwhile); each one's table
# goes to results/bench/<name>.md and BENCHMARKS.md is written from them by hand.
#   bash bench/run_all.sh [REPS]
set -euo pipefail
cd "$(dirname "$0")"
REPS=${1:-5}
OUT=../results/bench
mkdir -p "$OUT"
for b in p1_ddp_vs_torchrun p2_ddp_scaling p3_pipeline_vs_torch p4_pipeline_bubble p5_ps_straggler \
         p6_startup p7_sweep_overhead plan_check p9_workloads; do
    echo "== $b ($(date +%T))"
    ../.venv/bin/python "$b.py" --reps "$REPS" 2>"$OUT/$b.log" | tee "$OUT/$b.md"
done
echo "== ddp_comm ($(date +%T))"
../.venv/bin/python ddp_comm.py --reps "$REPS" --epochs 6 2>"$OUT/ddp_comm.log" | tee "$OUT/ddp_comm.md"
