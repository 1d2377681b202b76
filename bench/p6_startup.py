"""P6: time from command start to the first training step, raydist ddp (2 workers) against
torchrun (2 ranks), each launched as a fresh command, alternating; raydist twice: fresh (the
command starts its own embedded Ray) and joining a running local Ray (`raydist ray start`,
started once before the rounds and stopped after, as a user iterating on a laptop keeps it).

    .venv/bin/python bench/p6_startup.py --reps 5
    .venv/bin/python bench/p6_startup.py --phases   # where a joined launch spends its time

--phases: one joined launch with the processes on this machine polled every 50 ms; each Ray
process's title (Ray sets it to the actor's class and the method it runs) is timed from the
command's start, first seen to last seen, beside the driver's own lines: the timeline of
what runs before the first step.

raydist: `raydist train --strategy ddp --workers 2 --epochs 1 ...`; its first step began at the
arrival of the "epoch 1" line minus the epoch time that line reports (so the figure includes up
to one 0.2 s poll of the driver and the validation pass: a slight overestimate). torchrun:
the peer stamps its first step itself.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common

from raydist.runtime import connect

EPOCH_LINE = re.compile(r"^epoch 1 .* ([0-9.]+) s$")


RAYDIST = str(Path(sys.executable).parent / "raydist")


def raydist_startup(spec_args: list[str], env: dict[str, str],
                    lines: list[tuple[float, str]] | None = None) -> list[float]:
    """Seconds from the command's start to its first step; `lines`: its output, timed."""
    with tempfile.TemporaryDirectory(prefix="p6_") as out:
        cmd = [RAYDIST, "train", *spec_args, "--out", out]
        launched = time.time()
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                if lines is not None:
                    lines.append((time.time() - launched, line.strip()))
                m = EPOCH_LINE.match(line.strip())
                if m:
                    first = time.time() - float(m.group(1)) - launched
            proc.wait(timeout=300)
    return [first]


def phases(spec_args: list[str], env: dict[str, str]) -> None:
    """One launch, with every Ray process's titles timed (first and last seen, s from start)."""
    seen: dict[str, list[float]] = {}
    done, start = threading.Event(), time.time()

    def poll() -> None:
        while not done.is_set():
            ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
            now = time.time() - start
            for row in ps.splitlines():
                pid, _, title = row.strip().partition(" ")
                if title.startswith("ray::") or "default_worker.py" in title:
                    name = f"{pid} {title.split(' ')[0] if title.startswith('ray::') else 'starting'}"
                    seen.setdefault(name, [now, now])[1] = now
            time.sleep(0.05)

    watcher = threading.Thread(target=poll)
    watcher.start()
    lines: list[tuple[float, str]] = []
    try:
        first = raydist_startup(spec_args, env, lines)[0]
    finally:
        done.set()
        watcher.join()
    rows = [[f"process {name}", a, b] for name, (a, b) in seen.items() if a < first + 1]
    rows += [[f"driver prints: {text[:60]}", t, t] for t, text in lines if t < first + 1]
    rows.append(["first step", first, first])
    print(common.markdown(["event", "first seen, s", "last seen, s"], sorted(rows, key=lambda r: r[1])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--phases", action="store_true", help="one joined launch's timeline instead")
    args = p.parse_args()
    spec = common.spec(strategy="ddp", workers=2, epochs=1)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in common.BENCH.items() if k != "epochs"]
    flags += ["--strategy=ddp", "--workers=2", "--epochs=1"]

    def peer() -> list[float]:
        r = common.torchrun("torch_ddp.py", 2, common.peer_args(spec))
        return [r["first_step"] - r["launched"]]

    with tempfile.TemporaryDirectory(prefix="p6ray_", dir="/tmp") as home:
        fresh = {**os.environ, connect.LOCAL_RAY: f"{home}/none.yaml"}
        kept = {**os.environ, connect.LOCAL_RAY: f"{home}/local-ray.yaml"}
        subprocess.run([RAYDIST, "ray", "start"], env=kept, check=True, timeout=300)
        try:
            if args.phases:
                raydist_startup(flags, kept)  # the kept Ray's first fit: its caches warm
                phases(flags, kept)
                return
            times = common.alternate({"fresh": lambda: raydist_startup(flags, fresh),
                                      "joined": lambda: raydist_startup(flags, kept),
                                      "torchrun": peer}, args.reps)
        finally:
            subprocess.run([RAYDIST, "ray", "stop"], env=kept, check=False, timeout=120)
    med = {name: common.median(t) for name, t in times.items()}
    print(f"\nP6 on {common.machine()}; 2 workers/ranks x 1 thread; medians of {args.reps} launches")
    print(common.markdown(["command", "start to first step, s", "ratio to torchrun"], [
        ["raydist train --strategy ddp --workers 2 (fresh)", med["fresh"], med["fresh"] / med["torchrun"]],
        ["the same, with a running local Ray (`raydist ray start`)", med["joined"],
         med["joined"] / med["torchrun"]],
        ["torchrun --nproc_per_node 2", med["torchrun"], 1.0]]))


if __name__ == "__main__":
    main()
