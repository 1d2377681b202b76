"""P6: time from command start to the first training step, raydist ddp (2 workers) against
torchrun (2 ranks), each launched as a fresh command, alternating; raydist twice: fresh (the
command starts its own embedded Ray) and joining a running local Ray (`raydist ray start`,
started once before the rounds and stopped after, as a user iterating on a laptop keeps it).

    .venv/bin/python bench/p6_startup.py --reps 5

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
import time
from pathlib import Path

import common

from raydist import cluster

EPOCH_LINE = re.compile(r"^epoch 1 .* ([0-9.]+) s$")


RAYDIST = str(Path(sys.executable).parent / "raydist")


def raydist_startup(spec_args: list[str], env: dict[str, str]) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="p6_") as out:
        cmd = [RAYDIST, "train", *spec_args, "--out", out]
        launched = time.time()
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                m = EPOCH_LINE.match(line.strip())
                if m:
                    first = time.time() - float(m.group(1)) - launched
            proc.wait(timeout=300)
    return [first]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    spec = common.spec(strategy="ddp", workers=2, epochs=1)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in common.BENCH.items() if k != "epochs"]
    flags += ["--strategy=ddp", "--workers=2", "--epochs=1"]

    def peer() -> list[float]:
        r = common.torchrun("torch_ddp.py", 2, common.peer_args(spec))
        return [r["first_step"] - r["launched"]]

    with tempfile.TemporaryDirectory(prefix="p6ray_", dir="/tmp") as home:
        fresh = {**os.environ, cluster.LOCAL_RAY: f"{home}/none.yaml"}
        kept = {**os.environ, cluster.LOCAL_RAY: f"{home}/local-ray.yaml"}
        subprocess.run([RAYDIST, "ray", "start"], env=kept, check=True, timeout=300)
        try:
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
