"""One tp worker (a Ray Train worker): its part of every split layer, the engine's epoch loop
(raydist.raytrain.worker) on its group's shard of every global batch; checkpoints via Ray
Train, one file per rank with that rank's shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.device_mesh import init_device_mesh

from raydist.engine import Record, checkpoint, train_epoch
from raydist.optim import training
from raydist.raytrain.worker import RayTrainReplica, new_folder, total
from raydist.strategies.tp import parallelize, shards

DIMS = ("dp", "tp")
"""The device mesh: rank r is in data-parallel group r // tp_size, at tensor-parallel place
r % tp_size, so a tensor-parallel group's ranks are neighbours (on one node, as Ray Train
places consecutive ranks)."""


def state_file(rank: int) -> str:
    return f"rank{rank}.pt"


class TPReplica(RayTrainReplica):
    """This rank's side of the engine's epoch loop: its part of every split layer, in
    data-parallel group `group` at tensor-parallel place `place` of the mesh."""

    def distribute(self, model: torch.nn.Module) -> torch.nn.Module:
        self.tp = self.spec.tensor_parallel
        self.dp = self.world // self.tp
        self.mesh = init_device_mesh(self.device.type, (self.dp, self.tp), mesh_dim_names=DIMS)
        self.group, self.place = self.mesh.get_local_rank("dp"), self.mesh.get_local_rank("tp")
        model.to(self.device)
        self.plan = parallelize.recipe(model, self.spec, self.tp)
        # split before the optimizer is made: it must hold the split parameters (DTensors)
        parallelize.parallelize(model, self.plan, self.mesh["tp"])
        return model

    def wrap(self, rule: torch.optim.Optimizer) -> torch.optim.Optimizer:
        # the step averages over the data-parallel groups before it measures and clips the norm
        if self.dp > 1:
            self.levers.reduce = shards.averager(rule, self.mesh.get_group("dp"), self.dp)
        return rule

    def train_epoch(self, epoch: int, batches: list[torch.Tensor]) -> tuple[float, Record]:
        # every rank of a tensor-parallel group trains on its group's shard of each batch
        with training(self.spec.optimizer, self.optimizer):
            loss = train_epoch(self.model, self.optimizer, self.data, batches, self.group, self.dp,
                               self.scheduler, self.levers)
        # a group's ranks all computed the group's loss: counted once
        summed = total([loss if self.place == 0 else 0.0], self.world, self.device)[0]
        return summed, {"world_size": self.world}

    def write(self, plain: dict[str, Any]) -> str | None:
        """Every rank writes its own shards; Ray Train puts the files in one checkpoint folder."""
        state = {"model": shards.to_plain(self.model.state_dict()),
                 "optimizer": shards.to_plain(self.optimizer.state_dict()), **plain,
                 "mesh": [self.dp, self.tp]}
        folder = new_folder()
        checkpoint.save(Path(folder) / state_file(self.rank), state)
        return folder

    def load(self, folder: Path) -> dict[str, Any]:
        """This rank's shards."""
        state = checkpoint.load(folder / state_file(self.rank))
        mesh = self.mesh["tp"]
        self.model.load_state_dict(shards.from_plain(state["model"], mesh))
        self.optimizer.load_state_dict(shards.from_plain(state["optimizer"], mesh))
        return state

    def final_state(self) -> dict[str, np.ndarray]:
        """The whole model under local's keys and layout (every rank gathers its group's)."""
        return {k: v.cpu().numpy() for k, v in parallelize.full_state(self.model, self.plan).items()}
