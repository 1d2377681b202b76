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
         p6_startup p7_sweep_overhead p8_main_job plan_check p9_workloads; do
    echo "== $b ($(date +%T))"
    ../.venv/bin/python "$b.py" --reps "$REPS" 2>"$OUT/$b.log" | tee "$OUT/$b.md"
done
for s in interleaved-1f1b zb-h1; do  # P4 for the other schedules, then DP x PP
    echo "== p4_pipeline_bubble --schedule $s ($(date +%T))"
    ../.venv/bin/python p4_pipeline_bubble.py --reps "$REPS" --schedule "$s" 2>"$OUT/p4_$s.log" | tee "$OUT/p4_$s.md"
done
echo "== p4_pipeline_bubble --replicas 2 ($(date +%T))"
../.venv/bin/python p4_pipeline_bubble.py --reps "$REPS" --replicas 2 2>"$OUT/p4_replicas.log" | tee "$OUT/p4_replicas.md"
echo "== p3_pipeline_vs_torch --only-replicas --nodes 2 ($(date +%T))"
../.venv/bin/python p3_pipeline_vs_torch.py --reps "$REPS" --only-replicas --nodes 2 \
    2>"$OUT/p3_nodes.log" | tee "$OUT/p3_nodes.md"
echo "== ddp_comm ($(date +%T))"
../.venv/bin/python ddp_comm.py --reps "$REPS" --epochs 6 2>"$OUT/ddp_comm.log" | tee "$OUT/ddp_comm.md"
