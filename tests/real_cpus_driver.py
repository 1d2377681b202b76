"""Runs of `raydist train`, one after the other, on ONE embedded Ray started here as the CLI
starts it on this machine (address "local", the machine's own CPU count: os.cpu_count()
logical CPUs, not the 4 of the test session's Ray). tests/test_real_cpus.py runs it as

    RAY_TMPDIR=<private dir> python tests/real_cpus_driver.py CONFIG.json

CONFIG: {"work": DIR, "runs": [{"name": NAME, "args": [ARG, ...]}, ...]}. Each run is
`raydist.cli.main(["train", *args, "--out", DIR/NAME])`, the CLI's own entry point, in this
process: every strategy's pre-flight finds this Ray and keeps it, so the runs cost one Ray start.
After each run `DIR/result.json` is rewritten (the Ray's CPUs; per run: its exit code and
seconds, or the exception that escaped), so a run that hangs leaves the earlier ones readable
and names itself in `DIR/progress.log`. A failed run does not stop the next."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import ray

from raydist.cli import main
from raydist.runtime import connect


def write(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)  # whole, for a reader that polls it


def run_all(config: dict[str, Any]) -> None:
    work = Path(config["work"])
    connect.start_local(num_cpus=os.cpu_count() or 1)  # as `raydist train` sizes an embedded Ray
    result: dict[str, Any] = {"cpus": ray.cluster_resources().get("CPU", 0.0), "runs": {}}
    with (work / "progress.log").open("a") as progress:
        for run in config["runs"]:
            print(f"{time.strftime('%H:%M:%S')} {run['name']}: raydist train {' '.join(run['args'])}",
                  file=progress, flush=True)
            start = time.monotonic()
            try:
                code = main(["train", *run["args"], "--out", str(work / run["name"])])
                done: dict[str, Any] = {"code": code}
            except Exception:  # noqa: BLE001 - recorded; the next run goes on
                done = {"code": None, "error": traceback.format_exc()[-3000:]}
            result["runs"][run["name"]] = {**done, "seconds": round(time.monotonic() - start, 1)}
            write(work / "result.json", result)


if __name__ == "__main__":
    try:
        run_all(json.loads(Path(sys.argv[1]).read_text()))
    finally:
        ray.shutdown()
