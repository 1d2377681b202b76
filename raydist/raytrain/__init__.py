"""The Ray Train machinery every strategy on Ray Train shares (ddp, fsdp, tp): the driver side
(driver.py: a channel actor for the records, TorchTrainer's set-up, the records and restart
lines on their way to `report`, interrupts) and the worker side (worker.py: the epoch loop
around a strategy's `Replica`, the stop broadcast, the memory gathered per worker, checkpoints
through Ray Train, the RNG states they hold).

A strategy gives a `Recipe`: its name (Ray Train's run name under out/ray/, the restart lines'
"<name> worker 1"), its per-rank class (worker.Replica's protocol), and where it differs from
the defaults, the resources one worker asks for and its worker count. Imports without Ray; the
modules below import Ray Train."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

STORAGE = "ray"
"""Ray Train keeps a run's checkpoints under out/STORAGE/<recipe name>/checkpoint_<time>/
(RunConfig's storage_path and name), the two latest of them."""


def per_worker(spec: Any, gpus: float) -> dict[str, float]:
    """By default on GPUs when the cluster has some now (not merely could scale to some: an
    autoscaler's GPU node type must not turn every run into a GPU run)."""
    gpu = spec.use_gpu if spec.use_gpu is not None else gpus > 0
    return {"CPU": float(spec.threads_per_worker), **({"GPU": 1.0} if gpu else {})}


def fixed_workers(spec: Any) -> int:
    return spec.max_workers


@dataclass(frozen=True)
class Recipe:
    name: str
    """the strategy's name: Ray Train's run name, and the workers' in restart lines"""
    replica: str
    """module.path:Class of the per-rank side (raytrain.worker.Replica), imported in each worker"""
    per_worker: Callable[[Any, float], dict[str, float]] = per_worker
    """(spec, the cluster's GPUs now) -> the resources one worker asks for"""
    num_workers: Callable[[Any], int | tuple[int, int]] = fixed_workers
    """a fixed count (by default `workers`), or (min, max) for Ray Train's elastic policy"""


def group_resources(spec: Any, gpus: float, workers: int, what: str) -> tuple[float, float, str]:
    """A strategy's `resources` for a group of `workers` workers: (CPUs, GPUs, what)."""
    need = per_worker(spec, gpus)
    return workers * need["CPU"], workers * need.get("GPU", 0.0), what


def run(spec: Any, report: Any, recipe: Recipe) -> Any:
    """A strategy's `run`: its recipe on Ray Train (driver.py, which imports Ray Train)."""
    from raydist.raytrain import driver

    return driver.run(spec, report, recipe)
