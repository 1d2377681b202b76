"""P8: the main job, as `make run` runs it after set-up: `raydist sweep tune_configs/quickstart.yaml`
then `raydist report`, each a fresh command; wall time of each, and the share of the whole spent
in training steps (the sum over trials and epochs of the engine's epoch_time_s: the training
passes, not evaluation, start-up, Tune or the report).

    .venv/bin/python bench/p8_main_job.py --reps 1
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import pandas as pd

QUICKSTART = common.BENCH_DIR.parent / "tune_configs" / "quickstart.yaml"


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, timeout=1200)
    return time.perf_counter() - start


def one_job() -> dict[str, float]:
    raydist = str(Path(sys.executable).parent / "raydist")
    with tempfile.TemporaryDirectory(prefix="p8_") as d:
        out = f"{d}/quickstart"
        sweep = timed([raydist, "sweep", str(QUICKSTART), "--out", out])
        report = timed([raydist, "report", out])
        results = pd.read_csv(f"{out}/results.csv")
    training = float(results["epoch_time_s"].sum())
    total = sweep + report
    return {"sweep_s": sweep, "report_s": report, "total_s": total, "training_s": training,
            "training_share": training / total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=1)
    args = p.parse_args()
    runs = []
    for rep in range(args.reps):
        runs.append(one_job())
        print(f"job {rep + 1}/{args.reps}: {runs[-1]['total_s']:.1f} s", file=sys.stderr, flush=True)
    med = {k: common.median([r[k] for r in runs]) for k in runs[0]}
    print(f"\nP8 on {common.machine()}; tune_configs/quickstart.yaml; medians of {args.reps} jobs")
    print(common.markdown(["sweep s", "report s", "make run after set-up, s", "training steps, s",
                           "share in training"],
                          [[med["sweep_s"], med["report_s"], med["total_s"], med["training_s"],
                            med["training_share"]]]))


if __name__ == "__main__":
    main()
