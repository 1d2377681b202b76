"""One tp worker (a Ray Train worker): its part of every split layer, the engine's epoch loop
(raydist.raytrain.worker) on its group's shard of every global batch; checkpoints via Ray
Train, one file per rank with that rank's shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.distributed.device_mesh import init_device_mesh

from raydist.config import RunSpec
from raydist.data import Dataset
from raydist.engine import (
    Record,
    checkpoint,
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
from raydist.strategies.tp import parallelize, shards

DIMS = ("dp", "tp")
"""The device mesh: rank r is in data-parallel group r // tp_size, at tensor-parallel place
r % tp_size, so a tensor-parallel group's ranks are neighbours (on one node, as Ray Train
places consecutive ranks)."""


def state_file(rank: int) -> str:
    return f"rank{rank}.pt"


class Replica:
    """This rank's side of the engine's epoch loop (raydist.raytrain.worker.Replica)."""

    def __init__(self, spec: RunSpec, data: Dataset, faults: Faults) -> None:
        self.rank, self.world, self.device = place()
        self.spec, self.faults = spec, faults
        self.tp = spec.tensor_parallel
        self.dp = self.world // self.tp
        self.mesh = init_device_mesh(self.device.type, (self.dp, self.tp), mesh_dim_names=DIMS)
        self.group, self.place = self.mesh.get_local_rank("dp"), self.mesh.get_local_rank("tp")
        self.model = build_model(spec, data).to(self.device)
        self.plan = parallelize.recipe(self.model, spec, self.tp)
        parallelize.parallelize(self.model, self.plan, self.mesh["tp"])
        # made after the split: the optimizer must hold the split parameters (DTensors)
        self.optimizer = make_optimizer(spec, self.model.named_parameters())
        self.scheduler = make_scheduler(spec, self.optimizer, total_steps(spec, data))
        if self.dp > 1:
            shards.average_over(self.optimizer, self.mesh.get_group("dp"), self.dp)
        self.history = self.restore()
        self.data = on_device(data, self.device)

    def train_epoch(self, epoch: int, batches: list[torch.Tensor]) -> tuple[float, Record]:
        # every rank of a tensor-parallel group trains on its group's shard of each batch
        with training(self.spec.optimizer, self.optimizer):
            loss = train_epoch(self.model, self.optimizer, self.data, batches, self.group, self.dp,
                               self.scheduler)
        # a group's ranks all computed the group's loss: counted once
        summed = total([loss if self.place == 0 else 0.0], self.world, self.device)[0]
        return summed, {"world_size": self.world}

    def evaluate(self) -> Record:
        return evaluate(self.model, self.data)

    def save(self, history: list[Record]) -> None:
        """Every rank writes its own shards; Ray Train puts the files in one checkpoint folder."""
        self.faults.maybe_fail(self.rank, history[-1]["epoch"])
        state = {"model": shards.to_plain(self.model.state_dict()),
                 "optimizer": shards.to_plain(self.optimizer.state_dict()),
                 "scheduler": self.scheduler.state_dict(), "epoch": history[-1]["epoch"],
                 "history": history, "rng": rng_states(), "mesh": [self.dp, self.tp]}
        folder = new_folder()
        checkpoint.save(Path(folder) / state_file(self.rank), state)
        report(history[-1], folder)

    def restore(self) -> list[Record]:
        """This rank's shards of the latest checkpoint Ray Train registered, if any."""
        with latest() as folder:
            if folder is None:
                return []
            state = checkpoint.load(folder / state_file(self.rank))
        mesh = self.mesh["tp"]
        self.model.load_state_dict(shards.from_plain(state["model"], mesh))
        self.optimizer.load_state_dict(shards.from_plain(state["optimizer"], mesh))
        restore_scheduler(self.scheduler, state.get("scheduler"))
        set_rng_states(state["rng"])
        return state["history"]

    def final_state(self) -> dict[str, np.ndarray]:
        """The whole model under local's keys and layout (every rank gathers its group's)."""
        return {k: v.cpu().numpy() for k, v in parallelize.full_state(self.model, self.plan).items()}
