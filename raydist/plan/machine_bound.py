"""The machine's bound on data parallelism: what N workers could reach here if they exchanged
nothing. N bare Ray actors, each training the same model with the same optimizer and threads on
its 1/N shard of every global batch (the engine's own `train_epoch`, rank r of N: the rows a ddp
worker of rank r trains on), all at once, with no communication between them.

    bound samples/s(N) = training samples per epoch / the slowest actor's epoch time

median over the epochs after the first (warm-up). On a laptop the bound is far below N times one
worker (the cores share caches, memory bandwidth, a turbo budget and other processes' load): a
strategy's efficiency against it says how much of what this machine allows the strategy reaches,
and so what its communication costs; efficiency against N says how far the machine is from ideal.

A sweep with `bound: true` measures it for each of its settings (raydist/sweep/) into
DIR/bound.csv; bench/p2_ddp_scaling.py beside ddp. The report's scaling table reads it.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch

from raydist.config import RunSpec
from raydist.config.run import read_only
from raydist.engine import global_batches, setup, train_epoch
from raydist.optim import training
from raydist.strategies import STRATEGIES, get

FILE = "bound.csv"


@ray.remote(num_cpus=0)  # placed beside whatever holds the CPUs: a sweep measures it between trials
class Bare:
    """One bare worker: the engine's step loop on one shard, nothing sent anywhere."""

    def prepare(self, spec: RunSpec, rank: int, world: int) -> None:
        torch.set_num_threads(spec.threads_per_worker)
        self.spec, self.rank, self.world = spec, rank, world
        self.data, self.model, self.optimizer = setup(spec)

    def epoch(self, epoch: int) -> float:
        """Seconds of one epoch's training on this actor's shard of every global batch."""
        batches = global_batches(self.spec, self.data, epoch)
        start = time.perf_counter()
        with training(self.spec.optimizer, self.optimizer):
            train_epoch(self.model, self.optimizer, self.data, batches, self.rank, self.world)
        return time.perf_counter() - start

    def samples(self) -> int:
        return self.data.n_train


def epoch_times(spec: RunSpec, actors: Sequence[Any], epochs: int) -> tuple[int, list[float]]:
    """Training samples per epoch, and the slowest actor's time of each epoch, of len(actors)
    bare workers training at once (each epoch starts together)."""
    n = len(actors)
    spec = spec.replace(strategy=data_parallel_group(), workers=n)  # its global batch, weak scaling too
    ray.get([a.prepare.remote(spec, r, n) for r, a in enumerate(actors)])
    samples = ray.get(actors[0].samples.remote())
    return samples, [max(ray.get([a.epoch.remote(e) for a in actors])) for e in range(1, epochs + 1)]


def data_parallel_group() -> str:
    """The strategy whose group of N the bound's N bare workers stand for: the first registered
    one that splits every batch over `workers` on Ray (ddp), so that a spec's global batch and
    each rank's rows are that group's."""
    return next(name for name in STRATEGIES if (s := get(name)).DATA_PARALLEL and s.COUNT == "workers"
                and s.resources is not None)


def group(spec: RunSpec, actors: Sequence[Any], epochs: int) -> float:
    """Bound samples/s of len(actors) bare workers: the median over the epochs after the first."""
    samples, slowest = epoch_times(spec, actors, epochs)
    return samples / statistics.median(slowest[1:] or slowest)


def start(n: int) -> list[Any]:
    return [Bare.remote() for _ in range(n)]


def stop(actors: Sequence[Any]) -> None:
    for a in actors:
        ray.kill(a)


def measure(specs: Sequence[RunSpec], counts: Sequence[int], epochs: int = 3) -> pd.DataFrame:
    """The bound of each spec at each worker count: one row per (setting, workers), the setting
    by the fields the bound depends on (`setting`). max(counts) actors are started once and
    reused, N of them at a time."""
    actors = start(max(counts))
    try:
        rows = [{**setting(spec), "workers": n, "samples_per_s": group(spec, actors[:n], epochs)}
                for spec in specs for n in sorted(set(counts))]
    finally:
        stop(actors)
    return pd.DataFrame(rows)


NOT_READ = ("strategy", "workers", "seed", "out", "epochs", "address", "max_failures")
"""Fields of a local run that leave its samples/s alone (the bound is per epoch, after warm-up)."""


def setting(spec: RunSpec) -> dict[str, Any]:
    """What the bound depends on: the fields local reads (the model, data, batch, optimizer,
    threads), flat (lists as '64,32', as results.csv holds them)."""
    raw = {k: v for k, v in spec.to_dict().items() if k != "strategy"}
    return {k: flat(v) for k, v in read_only(raw, "local").items() if k not in NOT_READ}


def flat(value: Any) -> Any:
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return ",".join(map(str, value)) if isinstance(value, list) else value


def wanted(specs: Sequence[RunSpec]) -> tuple[list[RunSpec], list[int]]:
    """Of a sweep's trial specs, one per setting run at more than one worker count (those a
    speedup is computed for), and those counts."""
    by: dict[str, tuple[RunSpec, set[int]]] = {}
    for spec in specs:
        key = json.dumps(setting(spec), sort_keys=True, default=str)
        by.setdefault(key, (spec, set()))[1].add(spec.max_workers)
    scaled = [(spec, counts) for spec, counts in by.values() if len(counts) > 1]
    return [s for s, _ in scaled], sorted(set().union(*(c for _, c in scaled)))


def save(table: pd.DataFrame, folder: Path) -> Path:
    path = folder / FILE
    table.to_csv(path, index=False)
    return path


def load(folder: Path) -> pd.DataFrame | None:
    """DIR/bound.csv, or None where the sweep measured no bound."""
    path = folder / FILE
    return pd.read_csv(path) if path.is_file() else None
