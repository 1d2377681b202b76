"""One fsdp worker (a Ray Train worker): the engine's epoch loop (raydist.raytrain.worker) on
this rank's shard of every global batch, through a model that holds 1/N of every parameter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh

from raydist.config import RunSpec
from raydist.data import Dataset
from raydist.engine import (
    Record,
    evaluate,
    make_optimizer,
    make_scheduler,
    restore_scheduler,
    total_steps,
    train_epoch,
)
from raydist.models import build_model
from raydist.optim import training
from raydist.raytrain.worker import (
    latest,
    new_folder,
    on_device,
    place,
    report,
    rng_states,
    set_rng_states,
    total,
)
from raydist.runtime.faults import Faults
from raydist.strategies.fsdp import checkpoints
from raydist.strategies.fsdp.parallelize import DTYPES, parallelize


class Replica:
    """This rank's side of the engine's epoch loop (raydist.raytrain.worker.Replica)."""

    def __init__(self, spec: RunSpec, data: Dataset, faults: Faults) -> None:
        self.rank, self.world, self.device = place()
        self.spec, self.faults = spec, faults
        model = build_model(spec, data).to(self.device)  # the same weights on every rank, then cut
        self.elements = sum(p.numel() for p in model.parameters())
        self.model = parallelize(model, spec, init_device_mesh(self.device.type, (self.world,)))
        # over the shards (DTensors), under the model's own names
        self.optimizer = make_optimizer(spec, self.model.named_parameters())
        self.scheduler = make_scheduler(spec, self.optimizer, total_steps(spec, data))
        self.history = self.restore()
        self.data = on_device(data.in_worker(ray.train.get_dataset_shard), self.device)

    def train_epoch(self, epoch: int, batches: list[torch.Tensor]) -> tuple[float, Record]:
        with training(self.spec.optimizer, self.optimizer):
            loss = train_epoch(self.model, self.optimizer, self.data, batches, self.rank, self.world,
                               self.scheduler)
        [loss] = total([loss], self.world, self.device)
        return loss, {"world_size": self.world, "bytes_per_step": self.bytes_per_step()}

    def bytes_per_step(self) -> float:
        """What the collectives of one step put on the wire, all workers together, as ddp counts
        an all-reduce: an all-gather or a reduce-scatter of P bytes over N workers sends
        (N-1)/N of it from each worker. Per step: the parameters gathered for the forward, again
        for the backward when reshard_after_forward freed them, the gradients reduce-scattered
        in float32."""
        n, wire = self.world, DTYPES[self.spec.fsdp_param_dtype].itemsize
        gathers = 2 if self.spec.reshard_after_forward else 1
        return (n - 1) * self.elements * (gathers * wire + 4)

    def evaluate(self) -> Record:
        return evaluate(self.model, self.data)  # every rank: each block's forward gathers it

    def save(self, history: list[Record]) -> None:
        self.faults.maybe_fail(self.rank, history[-1]["epoch"])
        rec = history[-1]
        plain = ({"epoch": rec["epoch"], "history": history, "rng": rng_states(),
                  "scheduler": self.scheduler.state_dict(), "world_size": self.world}
                 if self.rank == 0 else None)
        folder = new_folder()  # Ray Train puts every rank's files in the epoch's one folder
        checkpoints.save(Path(folder), self.model, self.optimizer, plain)
        report(rec, folder)

    def restore(self) -> list[Record]:
        with latest() as folder:
            if folder is None:
                return []
            plain = checkpoints.load(folder, self.model, self.optimizer)
        restore_scheduler(self.scheduler, plain.get("scheduler"))
        set_rng_states(plain["rng"])
        return plain["history"]

    def final_state(self) -> dict[str, np.ndarray]:
        """The whole model on rank 0 under local's keys (gathered: every rank takes part)."""
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=True))
        return {k: v.detach().cpu().numpy() for k, v in full.items()}
