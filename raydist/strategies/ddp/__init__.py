"""`ddp`: N replicas on Ray Train; every step all-reduces the gradients (DistributedDataParallel).

The recipe (`run`) is raydist.raytrain's: join Ray; make a channel actor for the per-epoch
records; Ray Train's TorchTrainer runs N workers, each of which builds ddp's `worker.DDPReplica`
(the model, the latest checkpoint restored, DDP with the chosen communication hook, comm.py)
and drives the engine's epoch loop on its shard of every global batch; the driver hands the
records to `report` as they come; rank 0 returns the final model.

shard_optimizer (ZeRO-1) wraps the rule in torch's ZeroRedundancyOptimizer (worker.py): each
rank keeps the optimizer state of its share of the parameters only.

The engine divides a worker's loss sum by global_batch / world (engine.denominator), so DDP's
gradient average is the single-process gradient of the global batch: the run follows `local`
to float32 round-off. grad_compression and local_sgd_steps change what the workers exchange
(comm.py). Every epoch ends in a checkpoint, so a restarted worker group, or a new run with
the same `out`, continues from the latest one.

This module imports without Ray: comm.py's registry is read by every RunSpec validation.
"""

from __future__ import annotations

from pathlib import Path

from raydist import raytrain
from raydist.config import RunSpec
from raydist.data import Dataset
from raydist.engine import Report, RunResult, checkpoint
from raydist.raytrain import STORAGE, Recipe
from raydist.strategies.ddp import cost  # noqa: F401 - its step time and bytes: strategy.cost

RESUMES = True
DATA_PARALLEL = True
"""Its N workers each train on 1/N of every global batch: the report sets its rows beside
the machine's compute bound (report/bound.py)."""
COUNT = "workers"
"""The knob that counts its workers (processes): N in `raydist plan`, its predicted bytes
and the report."""
RUN = "ddp"
"""Ray Train keeps a run's checkpoints under out/STORAGE/RUN/checkpoint_<time>/ (RunConfig's
storage_path and name), the two latest of them."""
STATE = "state.pt"  # the file inside every Ray Train checkpoint
STREAMS = True
"""Each worker reads a streamed data set through Ray Train's get_dataset_shard (raytrain/driver.py)."""


def check(spec: RunSpec, data: Dataset) -> None:
    raytrain.check(spec, data, raytrain.split_over_workers(spec))


def check_saved(spec: RunSpec) -> None:
    """Every checkpoint Ray Train may resume from is plain data (checkpoint.load): a worker
    restores one only inside Ray Train, so a tampered one is refused here, before Ray starts."""
    for path in sorted((Path(spec.out) / STORAGE / RUN).glob(f"checkpoint_*/{STATE}")):
        checkpoint.load(path)


def resources(spec: RunSpec, gpus: float) -> tuple[float, float, str]:
    """What the smallest group asks of a cluster that has `gpus` GPUs now (an elastic one starts
    with as many workers as fit, at least min)."""
    return raytrain.group_resources(spec, gpus, spec.min_workers, f"ddp with {spec.workers} workers")


def num_workers(spec: RunSpec) -> int | tuple[int, int]:
    """A fixed count, or (min, max): Ray Train's elastic policy starts the group with as many
    workers as the cluster holds and restarts it, bigger or smaller, from the latest
    checkpoint when nodes come or go."""
    return spec.workers if isinstance(spec.workers, int) else (spec.min_workers, spec.max_workers)


def run(spec: RunSpec, report: Report) -> RunResult:
    return raytrain.run(spec, report, RECIPE)


RECIPE = Recipe(RUN, "raydist.strategies.ddp.worker:DDPReplica", num_workers=num_workers)
