"""What every benchmark shares: the compute-bound config, the machine line, alternating
repetitions, raydist runs and torchrun peers, and the Markdown table.

Every benchmark runs both sides in one process tree, in turn (one warm-up round, then
`reps` counted rounds), so load drifting on a shared machine hits both sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch

from raydist import strategies
from raydist.config import RunSpec
from raydist.data import load_data
from raydist.engine import Record
from raydist.models import build_model as _build_model
from raydist.runtime import connect

BENCH_DIR = Path(__file__).resolve().parent
# Compute-bound: ~75 ms per step of 512 samples on one thread of this machine's EPYC core,
# 16 full steps per epoch (8192 training samples); 1.6 M parameters (6.6 MB of gradients).
BENCH: dict[str, Any] = {"data": "synthetic", "samples": 10240, "model": "mlp",
                         "hidden": "1024,1024,512", "batch_size": 512, "optimizer": "sgd",
                         "lr": 0.05, "epochs": 3, "threads_per_worker": 1}


def spec(**changes: Any) -> RunSpec:
    return RunSpec.from_dict({**BENCH, **changes})


def build_model(run_spec: RunSpec) -> torch.nn.Module:
    return _build_model(run_spec, load_data(run_spec))


def samples(run_spec: RunSpec) -> int:
    """Training samples per epoch."""
    return load_data(run_spec).n_train


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if "model name" in line), platform.processor())
    return (f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"torch {torch.__version__}, Ray {ray.__version__}, load average {os.getloadavg()[0]:.1f}")


def gpu_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


def start_ray() -> None:
    connect.start_local(num_cpus=max(4, os.cpu_count() or 1), resources={"trial_driver": 8})


def raydist_records(run_spec: RunSpec) -> list[Record]:
    """One fresh run (a new out folder, so nothing resumes); all its epoch records."""
    records: list[Record] = []
    with tempfile.TemporaryDirectory(prefix="raydist_bench_") as out:
        strategies.get(run_spec.strategy).run(run_spec.replace(out=out), records.append)
    return records


def steady(records: list[Record], key: str = "epoch_time_s") -> list[float]:
    """Epochs after the first (first-touch allocations, thread-pool start-up)."""
    return [r[key] for r in records[1:]] or [r[key] for r in records]


def torchrun(script: str, nproc: int, args: list[str], timeout: float = 600) -> dict[str, Any]:
    """Run bench/peers/SCRIPT under torchrun on loopback; its rank 0 prints one JSON line.
    `launched` is when torchrun was started (time.time()), for start-up measurements."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(connect.free_port()),
           str(BENCH_DIR / "peers" / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"{script} failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith("{"))
    return {**json.loads(line), "launched": launched}


def peer_args(run_spec: RunSpec) -> list[str]:
    return ["--spec", json.dumps(run_spec.to_dict())]


def alternate(variants: dict[str, Callable[[], list[float]]], reps: int,
              warm_up: bool = True) -> dict[str, list[float]]:
    """Every variant once per round, in turn; round 0 is a warm-up and is not kept (unless
    warm_up is False: for runs long enough to warm up in their own first epoch)."""
    kept: dict[str, list[float]] = {name: [] for name in variants}
    first = 0 if warm_up else 1
    for rep in range(first, reps + 1):
        for name, measure in variants.items():
            values = measure()
            if rep:
                kept[name] += values
        print(f"{'warm-up' if rep == 0 else f'round {rep}/{reps}'} done", file=sys.stderr, flush=True)
    return kept


def median(values: list[float]) -> float:
    return statistics.median(values)


def markdown(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def peer_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of a benchmark against a torchrun peer (P1, P13)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo",
                   help="nccl: every worker and rank on its own GPU")
    return p


def against_torchrun(row: str, ours: str, peer: str, script: str, args: argparse.Namespace) -> None:
    """Row `row` (P1, P13): raydist's strategy `ours` against torch's `peer` under torchrun
    (bench/peers/SCRIPT), same model, data and batch order, alternating; the steady epochs'
    medians and their ratio."""
    gpu = args.backend == "nccl"
    run_spec = spec(strategy=ours, workers=args.workers, use_gpu=gpu)
    extra = [*peer_args(run_spec), "--backend", args.backend]
    start_ray()
    times = alternate({
        f"raydist {ours}": lambda: steady(raydist_records(run_spec)),
        peer: lambda: torchrun(script, args.workers, extra)["epoch_times"][1:],
    }, args.reps)
    ray.shutdown()
    mine, theirs = median(times[f"raydist {ours}"]), median(times[peer])
    where = (f"{args.workers} GPUs ({gpu_name()}), nccl" if gpu
             else f"{args.workers} workers x 1 thread")
    print(f"\n{row} on {machine()}; {run_spec.model} {run_spec.hidden} on {run_spec.data}, batch "
          f"{run_spec.batch_size}, {where}; medians of {len(times[peer])} epochs")
    print(markdown(["side", "median epoch s", "raydist / peer"],
                   [[f"raydist {ours}", mine, mine / theirs], [peer, theirs, 1.0]]))
