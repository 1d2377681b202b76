"""The Ray Train machinery every strategy on Ray Train shares (ddp, fsdp, tp): the driver side
(driver.py: a channel actor for the records, TorchTrainer's set-up, the records and restart
lines on their way to `report`, interrupts) and the worker side (worker.py: the skeleton of a
strategy's per-rank class, `RayTrainReplica`, the epoch loop around it, the stop broadcast, the
memory gathered per worker, checkpoints through Ray Train, the RNG states they hold).

Every such strategy checks its spec with `check` (saying what its batch splits over, `Split`;
adding its own checks), and gives a `Recipe`: its name (Ray Train's run name under out/ray/, the
restart lines' "<name> worker 1"), its per-rank class (a RayTrainReplica), and where it differs
from the defaults, the resources one worker asks for and its worker count. Imports without Ray; the
modules below import Ray Train."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raydist.errors import ConfigError
from raydist.optim import OPTIMIZERS

STORAGE = "ray"
"""Ray Train keeps a run's checkpoints under out/STORAGE/<recipe name>/checkpoint_<time>/
(RunConfig's storage_path and name), the two latest of them."""


@dataclass(frozen=True)
class Split:
    """What a strategy splits each global batch over, as `check` tests it and its messages name
    it: at most `most` data-parallel replicas, and a global batch that divides by `step`."""

    most: int
    step: int
    workers: str
    """`workers` as the messages give it (what the user wrote, and what it makes)"""
    over: str
    """what the global batch must divide by, in words"""
    unit: str = ""
    """what the most it may be counts, where not workers (" groups")"""


def split_over_workers(spec: Any) -> Split:
    """ddp's and fsdp's split: over the workers. An elastic group (ddp) may run at any size in its
    range; the batch splits evenly at each of them, so every size follows the same (local's)
    trajectory and a resize is seamless."""
    w = spec.max_workers
    step = math.lcm(*range(spec.min_workers, w + 1))
    over = (f"workers ({w})" if isinstance(spec.workers, int) else
            f"every worker count in {spec.workers} (elastic), i.e. by {step}")
    return Split(w, step, str(spec.workers), over)


def check(spec: Any, data: Any, split: Split) -> None:
    """What every strategy on Ray Train needs of the spec and data: no more replicas than
    training samples (a replica past the last sample would never see one), and a global batch
    that splits evenly over them (gd: the whole set, split as evenly as possible). A short last
    batch may leave some replicas an empty shard: they add a zero gradient."""
    n, batch = data.n_train, spec.global_batch
    if split.most > n:
        raise ConfigError(f"workers: got {split.workers}, but the data has only {n} training samples; "
                          f"expected at most {n}{split.unit}")
    if not OPTIMIZERS[spec.optimizer].full_batch and batch % split.step:
        raise ConfigError(f"batch_size: got {batch}; the global batch must divide by {split.over}, "
                          f"e.g. {max(split.step, batch // split.step * split.step)}")


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
    """module.path:Class of the per-rank side (a raytrain.worker.RayTrainReplica), imported in each
    worker"""
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
