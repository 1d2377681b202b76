"""P6: time from command start to the first training step, raydist ddp (2 workers) against
torchrun (2 ranks), each launched as a fresh command, alternating.

    .venv/bin/python bench/p6_startup.py --reps 5

raydist: `raydist train --strategy ddp --workers 2 --epochs 1 ...` (embedded Ray started by the
command itself); its first step began at the arrival of the "epoch 1" line minus the epoch time
that line reports (so the figure includes up to one 0.2 s poll of the driver and the validation
pass: a slight overestimate). torchrun: the peer stamps its first step itself.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

EPOCH_LINE = re.compile(r"^epoch 1 .* ([0-9.]+) s$")


def raydist_startup(spec_args: list[str]) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="p6_") as out:
        cmd = [str(Path(sys.executable).parent / "raydist"), "train", *spec_args, "--out", out]
        launched = time.time()
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
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

    times = common.alternate({"raydist ddp": lambda: raydist_startup(flags), "torchrun": peer}, args.reps)
    ours, theirs = common.median(times["raydist ddp"]), common.median(times["torchrun"])
    print(f"\nP6 on {common.machine()}; 2 workers/ranks x 1 thread; medians of {args.reps} launches")
    print(common.markdown(["command", "start to first step, s", "ratio to torchrun"],
                          [["raydist train --strategy ddp --workers 2", ours, ours / theirs],
                           ["torchrun --nproc_per_node 2", theirs, 1.0]]))


if __name__ == "__main__":
    main()
