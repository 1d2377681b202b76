"""P7: a `raydist sweep` of 8 local trials (2 at a time) against the ideal, the sum of the
trials' own training times divided by the concurrency: the overhead ratio.

    .venv/bin/python bench/p7_sweep_overhead.py --reps 5

Two rows, alternating: the sweep fresh (it starts its own embedded Ray) and joining a local Ray
that `raydist ray start` keeps (started once before the rounds, stopped after).

The sweep's wall time is the whole command (Ray start, Tune, 8 trials, results.csv); a trial's
own time is the wall time its last epoch reports (from its first step).

    .venv/bin/python bench/p7_sweep_overhead.py --phases   # where one sweep spends its time

--phases: one sweep, its printed lines timed from the command's start, and each trial's span
(its end: its line; its start: that less its own training time), so the gaps before the first
trial, between trials and after the last show what is not training.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import pandas as pd
import yaml

from raydist.runtime import connect

CONCURRENCY = 2
RAYDIST = str(Path(sys.executable).parent / "raydist")


def sweep_file(folder: Path) -> Path:
    cfg = {**common.BENCH, "strategy": "local", "epochs": 3,
           "lr": {"grid": [0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2]},
           "sweep": {"metric": "val_accuracy", "mode": "max", "seeds": [0], "scheduler": "none",
                     "max_concurrent": CONCURRENCY}}
    path = folder / "p7.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def one_sweep(lines: list[tuple[float, str]] | None = None,
              env: dict[str, str] | None = None) -> tuple[float, float]:
    """(sweep wall time, sum of trial times / concurrency); `lines`: its output, timed."""
    with tempfile.TemporaryDirectory(prefix="p7_") as d:
        cmd = [RAYDIST, "sweep", str(sweep_file(Path(d))), "--out", f"{d}/out"]
        t = time.perf_counter()
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                if lines is not None and line.strip():
                    lines.append((time.perf_counter() - t, line.strip()))
            if proc.wait(timeout=900):
                raise RuntimeError(f"the sweep failed: {lines[-5:] if lines else ''}")
        wall = time.perf_counter() - t
        results = pd.read_csv(f"{d}/out/results.csv")
    trial_times = results.groupby("trial_id")["wall_time_s"].max()
    if lines is not None:
        lines.extend((-1.0, f"trial {tid} trained {s:.2f} s") for tid, s in trial_times.items())
    assert len(trial_times) == 8, f"expected 8 trials, got {len(trial_times)}"
    return wall, trial_times.sum() / CONCURRENCY


def phases() -> None:
    lines: list[tuple[float, str]] = []
    wall, ideal = one_sweep(lines)
    print(common.markdown(["s from start", "line"], [[t, text[:100]] for t, text in lines if t >= 0]))
    print("\n" + "\n".join(text for t, text in lines if t < 0))
    print(f"\nwall {wall:.2f} s, sum of trial times / {CONCURRENCY} = {ideal:.2f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--phases", action="store_true", help="one sweep's timeline instead")
    args = p.parse_args()
    if args.phases:
        phases()
        return
    with tempfile.TemporaryDirectory(prefix="p7ray_", dir="/tmp") as home:
        # fresh: the sweep starts its own embedded Ray; joined: it joins one `raydist ray start`
        # keeps, as a user iterating on a laptop would (P6's two rows)
        envs = {"fresh": {**os.environ, connect.LOCAL_RAY: f"{home}/none.yaml"},
                "joined": {**os.environ, connect.LOCAL_RAY: f"{home}/local-ray.yaml"}}
        subprocess.run([RAYDIST, "ray", "start"], env=envs["joined"], check=True, timeout=300)
        try:
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in envs}
            for rep in range(args.reps):
                for name, env in envs.items():
                    runs[name].append(one_sweep(env=env))
                    print(f"sweep {rep + 1}/{args.reps} ({name}): {runs[name][-1][0]:.1f} s",
                          file=sys.stderr, flush=True)
        finally:
            subprocess.run([RAYDIST, "ray", "stop"], env=envs["joined"], check=False, timeout=120)
    print(f"\nP7 on {common.machine()}; 8 local trials of {common.BENCH['model']} "
          f"{common.BENCH['hidden']}, 3 epochs, {CONCURRENCY} at a time; medians of {args.reps} sweeps")
    print(common.markdown(
        ["sweep", "sweep wall s", "sum of trial times / concurrency, s", "overhead ratio"],
        [[name, common.median([r[0] for r in got]), common.median([r[1] for r in got]),
          common.median([r[0] / r[1] for r in got])] for name, got in runs.items()]))

if __name__ == "__main__":
    main()
