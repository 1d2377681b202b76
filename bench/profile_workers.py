"""Where a worker's timed epoch goes: py-spy on every training process of one run, side by side
for raydist's ddp and the bound's bare actors (raydist/plan/machine_bound.py), on P2's workload. This is the
profile behind P2a and P2c in BENCHMARKS.md.

    .venv/bin/python bench/profile_workers.py --epochs 40 --rate 100 --rounds 2

For each variant it runs the workload once on a fresh embedded Ray and attaches
`py-spy record --nonblocking --threads` (50 Hz) to every Ray Train worker and bare actor as it
appears. Only the samples of the thread that trains, taken inside the timed epoch (the engine's
`Measured.train_epoch` for ddp, `Bare.epoch` for the bound), are counted, and split by the
innermost frame that names what they do. The other threads of those processes (Ray's and
Ray Train's) are counted beside, in samples per second of the run.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common
import ray
from p2_ddp_scaling import P2, bound_side, raydist_side

TIMED = ("train_epoch (raydist/raytrain/worker.py", "epoch (raydist/plan/machine_bound.py")
PROCESSES = ("ray::RayTrainWorker", "ray::Bare")
BUCKETS = [  # a sample goes to the bucket of its innermost frame that names one
    ("memory measure and gather", ("raydist/memory/", "gather (raydist/raytrain")),
    ("collectives (gloo)", ("distributed_c10d.py",)),
    ("DDP's reducer and hooks", ("torch/nn/parallel/distributed.py", "raydist/strategies/ddp/comm.py",
                                 "Reducer::", "reducer.cpp")),
    ("lr schedule", ("lr_scheduler.py",)),
    ("optimizer step", ("torch/optim/", "raydist/optim/")),
    ("backward", ("backward (torch/", "torch/autograd/")),
    ("forward and loss", ("forward (", "_call_impl", "_ce (", "_mse (", "_bce (")),
    ("batch rows", ("rows (raydist/data",)),
]


NATIVE: list[str] = []  # C++ frames too (DDP's reducer runs inside backward); py-spy then pauses
# the process at each sample (it cannot unwind native stacks of a running one)


def spy(pid: int, out: Path, rate: int) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(pid),
                             *(NATIVE or ["--nonblocking"]), "--threads", "-r", str(rate),
                             "--format", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ours(pid: int) -> bool:
    """Whether `pid` descends from this process (our embedded Ray's, not another Ray's here)."""
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
        if pid == os.getpid():
            return True
    return False


def watch(folder: Path, rate: int, done: threading.Event) -> list[subprocess.Popen]:
    """Attach py-spy to every training process of ours that appears until `done` is set."""
    seen: set[int] = set()
    spies: list[subprocess.Popen] = []
    while not done.is_set():
        ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
        for line in ps.splitlines():
            pid, _, args = line.strip().partition(" ")
            if args.startswith(PROCESSES) and int(pid) not in seen and ours(int(pid)):
                seen.add(int(pid))
                spies.append(spy(int(pid), folder / f"{pid}.raw", rate))
        time.sleep(0.2)
    return spies


def bucket(frames: list[str]) -> str:
    """The bucket of the innermost frame (frames: innermost first) that names one."""
    for frame in frames:
        for name, marks in BUCKETS:
            if any(m in frame for m in marks):
                return name
    return "other"


def split(raw: Path) -> tuple[collections.Counter, collections.Counter]:
    """The training thread's samples in the timed epoch by bucket; the other threads' samples
    by their three innermost frames."""
    timed: collections.Counter = collections.Counter()
    trainers, others = set(), collections.Counter()
    lines = [ln.rsplit(" ", 1) for ln in raw.read_text().splitlines() if ln.strip()]
    for stack, _ in lines:
        if any(m in stack for m in TIMED):
            trainers.add(stack.split(";", 1)[0])
    for stack, count in lines:
        thread = stack.split(";", 1)[0]
        if thread not in trainers:
            others[" < ".join(f.split(" (")[0] for f in stack.split(";")[:0:-1][:3])] += int(count)
        elif any(m in stack for m in TIMED):
            timed[bucket(stack.split(";")[::-1])] += int(count)
    return timed, others


def profile(name: str, run, rate: int) -> None:
    with tempfile.TemporaryDirectory(prefix="raydist_spy_") as tmp:
        folder, done = Path(tmp), threading.Event()
        spies: list[subprocess.Popen] = []
        watcher = threading.Thread(target=lambda: spies.extend(watch(folder, rate, done)))
        watcher.start()
        t = time.perf_counter()
        try:
            rates = run()
        finally:
            wall = time.perf_counter() - t
            done.set()
            watcher.join()
            for s in spies:
                s.wait(timeout=30)
        print(f"\n## {name}: median {common.median(rates):.0f} samples/s over {len(rates)} epochs")
        for raw in sorted(folder.glob("*.raw")):
            timed, others = split(raw)
            n = sum(timed.values()) or 1
            print(f"\nprocess {raw.stem}: {n} samples in the timed epochs; other threads "
                  f"{sum(others.values()) / wall:.1f} samples/s over the run's {wall:.0f} s "
                  f"(rate {rate}/s)")
            print(common.markdown(["in the timed epoch", "share"],
                                  [[b, c / n] for b, c in timed.most_common()]))
            print(common.markdown(["other threads, innermost frames", "samples/s"],
                                  [[f, c / wall] for f, c in others.most_common(4)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--rate", type=int, default=50)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--native", action="store_true", help="C++ frames too (slower sampling)")
    p.add_argument("--only", default="", help="the variants whose name contains this")
    args = p.parse_args()
    NATIVE.extend(["--native"] if args.native else [])
    base = common.spec(**{**P2, "epochs": args.epochs})
    print(f"profile on {common.machine()}; {base.model} {base.hidden} on {base.data}, batch "
          f"{base.batch_size}, {base.optimizer}, {args.epochs} epochs", file=sys.stderr)
    common.start_ray()
    variants = {
        "bound, 1 bare actor": bound_side(base, 1),
        "ddp, 1 worker": raydist_side(base.replace(strategy="ddp", workers=1)),
        "bound, 2 bare actors": bound_side(base, 2),
        "ddp, 2 workers, local SGD k=16": raydist_side(
            base.replace(strategy="ddp", workers=2, local_sgd_steps=16)),
    }
    for r in range(1, args.rounds + 1):  # alternating, so drifting load hits every variant
        for name, run in variants.items():
            if args.only in name:
                profile(f"{name}, round {r}", run, args.rate)
    ray.shutdown()


if __name__ == "__main__":
    main()
