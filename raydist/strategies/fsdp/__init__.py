"""`fsdp`: N workers on Ray Train, each holding 1/N of every parameter, gradient and optimizer
state (torch's FSDP2, torch.distributed.fsdp.fully_shard).

The recipe (`run`) is raydist.raytrain's, as ddp's: a channel actor for the records, Ray Train's
TorchTrainer over N workers (gloo on CPU, nccl on GPU), each building fsdp's `worker.FSDPReplica`:
the model sharded block by block, then at the root (parallelize.py), the optimizer over the
shards, the latest checkpoint restored (checkpoints.py). Every block's forward all-gathers its
parameters; its backward reduce-scatters the gradients, each rank keeping the sum of its shard.

Loss scaling is ddp's: FSDP's reduce-scatter AVERAGES the gradients over the N workers, as
DDP's all-reduce does, so each worker divides its loss sum by global_batch / N
(engine.denominator) and the run follows `local` to float32 round-off. The optimizer steps
each shard on its own: raydist's rules act on each tensor elementwise (or through DTensor ops,
which keep the whole tensor's meaning).

Knobs: reshard_after_forward (ZeRO-3; false: ZeRO-2, the gathered parameters kept from the
forward to the backward), fsdp_param_dtype (bfloat16: the forward and backward in bf16, the
gradients reduced and the weights stepped in float32), cpu_offload (shards in CPU memory
between uses). Checkpoints: torch.distributed.checkpoint, every worker writing its shard into
the epoch's Ray Train checkpoint; a resume at another worker count reshards them.
"""

from __future__ import annotations

from pathlib import Path

from raydist import raytrain
from raydist.config import RunSpec
from raydist.data import Dataset
from raydist.engine import Report, RunResult
from raydist.raytrain import STORAGE, Recipe
from raydist.strategies.fsdp import cost  # noqa: F401 - its step time and bytes: strategy.cost

RESUMES = True
DATA_PARALLEL = True
"""Its N workers each train on 1/N of every global batch (and hold 1/N of the model state):
the report sets its rows beside the machine's compute bound (report/bound.py)."""
COUNT = "workers"
"""The knob that counts its workers (processes): N in `raydist plan`, its predicted bytes
and the report."""
RUN = "fsdp"
"""Ray Train keeps a run's checkpoints under out/STORAGE/RUN/checkpoint_<time>/."""
STREAMS = True
"""Each worker reads a streamed data set as ddp's do (raydist.raytrain.driver.streams)."""


def check(spec: RunSpec, data: Dataset) -> None:
    raytrain.check(spec, data, raytrain.split_over_workers(spec))


def check_saved(spec: RunSpec) -> None:
    """Every checkpoint Ray Train may resume from holds plain data and tensors only
    (checkpoints.check), refused here before Ray starts."""
    from raydist.strategies.fsdp import checkpoints

    for folder in sorted((Path(spec.out) / STORAGE / RUN).glob("checkpoint_*")):
        if folder.is_dir():  # beside them: Ray Train's checkpoint_manager_snapshot.json
            checkpoints.check(folder)


def resources(spec: RunSpec, gpus: float) -> tuple[float, float, str]:
    return raytrain.group_resources(spec, gpus, spec.max_workers, f"fsdp with {spec.workers} workers")


def run(spec: RunSpec, report: Report) -> RunResult:
    return raytrain.run(spec, report, RECIPE)


RECIPE = Recipe(RUN, "raydist.strategies.fsdp.worker:FSDPReplica")
