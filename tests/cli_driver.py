"""Runs of `raydist train`, one after the other, in ONE process on ONE embedded Ray started here
as the CLI starts it (address "local"; by default the machine's own CPU count, os.cpu_count(), as
`raydist train` sizes it; "cpus" in the config says otherwise). A test calls `drive`, which runs

    RAY_TMPDIR=<private dir> python tests/cli_driver.py CONFIG.json

CONFIG: {"work": DIR, "runs": [{"name": NAME, "args": [ARG, ...]}, ...], "cpus": N (optional)}.
Each run is `raydist.cli.main(["train", *args, "--out", DIR/NAME])`, the CLI's own entry point:
every strategy's pre-flight finds this Ray and keeps it, so the runs cost one process and one
Ray start, not one each (a fresh `python -m raydist.cli` costs ~10 s here before it trains).
After each run `DIR/result.json` is rewritten (the Ray's CPUs; per run: its exit code and
seconds, or the exception that escaped; after the last, every actor the Ray ran), so a run
that hangs leaves the earlier ones readable and names itself in `DIR/progress.log`; what the
runs print goes to `DIR/driver.log`. A failed run does not stop the next."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any


def drive(work: Path, runs: list[dict[str, Any]], env: dict[str, str], limit_s: float,
          cpus: int | None = None, cwd: Path | None = None) -> dict[str, Any]:
    """Run `runs` in one driver process (its own RAY_TMPDIR; its Ray's processes stopped by PID
    afterwards, whatever happened); killed after `limit_s`. Returns result.json ({"runs": {}}
    if none was written) with "work" added."""
    from rayprocs import processes_of, stop

    work.mkdir(parents=True, exist_ok=True)
    config = {"work": str(work), "runs": runs, **({"cpus": cpus} if cpus else {})}
    (work / "config.json").write_text(json.dumps(config))
    ray_tmp = Path(tempfile.mkdtemp(prefix="rcd", dir="/tmp"))  # short: Ray's socket paths live here
    env = {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_TMPDIR"] = str(ray_tmp)
    try:
        with (work / "driver.log").open("w") as log:
            proc = subprocess.Popen([sys.executable, __file__, str(work / "config.json")],
                                    cwd=cwd or work, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                proc.wait(timeout=limit_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        stop(processes_of(str(ray_tmp)))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    path = work / "result.json"
    return {**(json.loads(path.read_text()) if path.exists() else {"runs": {}}), "work": work}


def write(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)  # whole, for a reader that polls it


def run_all(config: dict[str, Any]) -> None:
    import ray

    from raydist.cli import main
    from raydist.runtime import connect

    work = Path(config["work"])
    connect.start_local(num_cpus=config.get("cpus") or os.cpu_count() or 1)  # as `raydist train` does
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
    try:
        result["actors"] = actors()
    except Exception:  # noqa: BLE001 - the runs' results stay; a test asking for actors says why
        result["actors_error"] = traceback.format_exc()[-3000:]
    write(work / "result.json", result)


def actors() -> list[dict[str, Any]]:
    """Every actor this Ray ran (Ray's State API): its class and the runtime_env it carried."""
    from ray.util.state import list_actors

    return [{"class_name": a.class_name, "runtime_env": a.serialized_runtime_env or ""}
            for a in list_actors(detail=True, limit=10000)]


if __name__ == "__main__":
    try:
        run_all(json.loads(Path(sys.argv[1]).read_text()))
    finally:
        import ray

        ray.shutdown()
