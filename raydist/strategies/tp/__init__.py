"""`tp`: tensor parallelism on Ray Train workers (torch's DTensor `parallelize_module`).

The recipe (`run`) is raydist.raytrain's, as ddp's: a channel actor for the records, Ray Train's
TorchTrainer over `workers` (gloo on CPU, nccl on GPU), each building tp's `worker.TPReplica`.
The workers form a 2-D device mesh ("dp", "tp"): `workers / tp_size` data-parallel groups of
`tp_size` ranks. Within a group every split layer of the model's recipe (parallelize.py: Megatron's
column-then-row pairs; a transformer's heads split over the ranks) holds 1/tp_size of its
weights, and every rank of the group sees the group's shard of each global batch; across the
groups the gradients are averaged before each step (shards.averager, called by the engine's
step), as DDP does.

Loss scaling: each group divides its loss sum by global_batch / groups (engine.denominator);
within a group the split layers' collectives make the gradients those of the whole model
(DTensor's all-reduces), and the replicated parameters' gradients agree on every rank. So the
run follows `local` to float32 round-off. The training loss counts each group once.

Checkpoints: every rank writes its own shards (plain tensors and their placements) into the
epoch's Ray Train checkpoint, so a resume needs the same workers and tp_size (neither is
resumable); model.pt is gathered whole, under local's keys and layout.

This module imports without Ray (the pre-flight reads it).
"""

from __future__ import annotations

from pathlib import Path

from raydist import raytrain
from raydist.config import ConfigError, RunSpec
from raydist.data import Dataset
from raydist.engine import Report, RunResult, checkpoint
from raydist.models import build_model
from raydist.raytrain import STORAGE, Recipe
from raydist.strategies.tp import cost  # noqa: F401 - its step time and bytes: strategy.cost

RESUMES = True
DATA_PARALLEL = False
"""The ranks of a group split the model, each computing on the group's whole shard of every
batch: no compute bound of N workers applies."""
COUNT = "workers"
"""The knob that counts its workers (processes): N in `raydist plan`, its predicted bytes
and the report."""
RUN = "tp"
"""Ray Train keeps a run's checkpoints under out/STORAGE/RUN/checkpoint_<time>/."""
STREAMS = False
UNSPLIT = {"adafactor": "its factored second moments reduce a split matrix in place, which "
                        "DTensor does not support",
           "lamb": "its trust ratio reads each tensor's norm as a number, which a split tensor "
                   "gives for its own shard only"}
"""Optimizers tp refuses, and why."""


def check(spec: RunSpec, data: Dataset) -> None:
    from raydist.strategies.tp import parallelize

    if spec.optimizer in UNSPLIT:
        raise ConfigError(f"optimizer: tp cannot run '{spec.optimizer}': {UNSPLIT[spec.optimizer]}")
    parallelize.recipe(build_model(spec, data), spec, spec.tensor_parallel)  # refuses what cannot be split
    groups = spec.data_parallel  # the batch splits over the groups, not the workers
    raytrain.check(spec, data, raytrain.Split(
        groups, groups, f"{spec.workers} (tp_size {spec.tensor_parallel}: {groups} data-parallel groups)",
        f"the data-parallel groups (workers / tp_size = {groups})", " groups"))


def check_saved(spec: RunSpec) -> None:
    """Every rank's file of every checkpoint Ray Train may resume from is plain data
    (checkpoint.load), refused here before Ray starts."""
    for path in sorted((Path(spec.out) / STORAGE / RUN).glob("checkpoint_*/rank*.pt")):
        checkpoint.load(path)


def resources(spec: RunSpec, gpus: float) -> tuple[float, float, str]:
    what = f"tp with {spec.workers} workers (tp_size {spec.tensor_parallel})"
    return raytrain.group_resources(spec, gpus, spec.max_workers, what)


def run(spec: RunSpec, report: Report) -> RunResult:
    return raytrain.run(spec, report, RECIPE)


RECIPE = Recipe(RUN, "raydist.strategies.tp.worker:TPReplica")
