#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, from the repository root, in under 5 minutes:
#   bash bench/gpu_check.sh
# 1. ddp with the nccl backend on one GPU (Ray Train), against local on the CPU: same losses;
# 2. pipeline with both stages on the GPU (each stage actor gets half of it);
# 3. P1 with nccl: raydist ddp against torchrun DDP, 1 worker/rank per GPU.
# Set-up is the README's (`make setup`: torch==2.13.0 from PyPI is a CUDA build on Linux).
# Everything runs on an embedded local Ray; outputs go to results/gpu_check/.
set -euo pipefail
cd "$(dirname "$0")/.."
make setup >/dev/null
PY=.venv/bin/python
RD=.venv/bin/raydist
OUT=results/gpu_check
rm -rf "$OUT" && mkdir -p "$OUT"
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 1 ]; then
    echo "gpu_check: torch sees no CUDA GPU (torch $($PY -c 'import torch; print(torch.__version__)'))" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
COMMON=(--model mlp --data digits --hidden 256,256 --optimizer adam --epochs 3 --batch-size 64)

echo "== 1. ddp, nccl, 1 GPU vs local on the CPU"
$RD train --strategy local "${COMMON[@]}" --out "$OUT/local"
$RD train --strategy ddp --workers 1 --use-gpu true "${COMMON[@]}" --out "$OUT/ddp_gpu"
echo "== 2. pipeline, 2 stages on the GPU"
$RD train --strategy pipeline --stages 2 --microbatches 4 --use-gpu true "${COMMON[@]}" --out "$OUT/pipeline_gpu"
$PY - "$OUT" <<'PY'
import sys
import pandas as pd
out = sys.argv[1]
local = pd.read_csv(f"{out}/local/metrics.csv")
for run in ("ddp_gpu", "pipeline_gpu"):
    m = pd.read_csv(f"{out}/{run}/metrics.csv")
    diff = (m["train_loss"] - local["train_loss"]).abs().max()
    print(f"{run}: final train_loss {m['train_loss'].iloc[-1]:.5f} (local on CPU "
          f"{local['train_loss'].iloc[-1]:.5f}, max diff over epochs {diff:.2e}); "
          f"{m['samples_per_s'].iloc[-1]:.0f} samples/s")
    assert diff < 1e-3, f"{run} drifted from local: {diff}"
PY
echo "== 3. P1 with nccl, $GPUS GPU(s)"
(cd bench && ../$PY p1_ddp_vs_torchrun.py --reps 3 --workers "$GPUS" --backend nccl) | tee "$OUT/p1_nccl.md"
echo "gpu_check: all passed"
