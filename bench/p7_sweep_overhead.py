"""P7: a `raydist sweep` of 8 local trials (2 at a time) against the ideal, the sum of the
trials' own training times divided by the concurrency: the overhead ratio.

    .venv/bin/python bench/p7_sweep_overhead.py --reps 5

The sweep's wall time is the whole command (Ray start, Tune, 8 trials, results.csv); a trial's
own time is the wall time its last epoch reports (from its first step).
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
import yaml

CONCURRENCY = 2


def sweep_file(folder: Path) -> Path:
    cfg = {**common.BENCH, "strategy": "local", "epochs": 3,
           "lr": {"grid": [0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2]},
           "sweep": {"metric": "val_accuracy", "mode": "max", "seeds": [0], "scheduler": "none",
                     "max_concurrent": CONCURRENCY}}
    path = folder / "p7.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def one_sweep() -> tuple[float, float]:
    """(sweep wall time, sum of trial times / concurrency)."""
    with tempfile.TemporaryDirectory(prefix="p7_") as d:
        cmd = [str(Path(sys.executable).parent / "raydist"), "sweep", str(sweep_file(Path(d))),
               "--out", f"{d}/out"]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, timeout=900)
        wall = time.perf_counter() - t
        results = pd.read_csv(f"{d}/out/results.csv")
    trial_times = results.groupby("trial_id")["wall_time_s"].max()
    assert len(trial_times) == 8, f"expected 8 trials, got {len(trial_times)}"
    return wall, trial_times.sum() / CONCURRENCY


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    runs = []
    for rep in range(args.reps):
        runs.append(one_sweep())
        print(f"sweep {rep + 1}/{args.reps}: {runs[-1][0]:.1f} s", file=sys.stderr, flush=True)
    wall = common.median([r[0] for r in runs])
    ideal = common.median([r[1] for r in runs])
    ratio = common.median([r[0] / r[1] for r in runs])
    print(f"\nP7 on {common.machine()}; 8 local trials of {common.BENCH['model']} "
          f"{common.BENCH['hidden']}, 3 epochs, {CONCURRENCY} at a time; medians of {args.reps} sweeps")
    print(common.markdown(["sweep wall s", "sum of trial times / concurrency, s", "overhead ratio"],
                          [[wall, ideal, ratio]]))


if __name__ == "__main__":
    main()
