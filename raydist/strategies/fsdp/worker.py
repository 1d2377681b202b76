"""One fsdp worker (a Ray Train worker): the engine's epoch loop (raydist.raytrain.worker) on
this rank's shard of every global batch, through a model that holds 1/N of every parameter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh

from raydist.engine import Record, train_epoch
from raydist.optim import training
from raydist.raytrain.worker import RayTrainReplica, new_folder, total
from raydist.strategies.fsdp import checkpoints
from raydist.strategies.fsdp.parallelize import DTYPES, parallelize


class FSDPReplica(RayTrainReplica):
    """This rank's side of the engine's epoch loop: 1/N of every parameter (DTensors), the
    optimizer over the shards under the model's own names. Every rank evaluates: each block's
    forward gathers its parameters."""

    def distribute(self, model: torch.nn.Module) -> torch.nn.Module:
        model.to(self.device)  # the same weights on every rank, then cut
        self.elements = sum(p.numel() for p in model.parameters())
        return parallelize(model, self.spec, init_device_mesh(self.device.type, (self.world,)))

    def train_epoch(self, epoch: int, batches: list[torch.Tensor]) -> tuple[float, Record]:
        with training(self.spec.optimizer, self.optimizer):
            loss = train_epoch(self.model, self.optimizer, self.data, batches, self.rank, self.world,
                               self.scheduler, self.levers)
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

    def write(self, plain: dict[str, Any]) -> str | None:
        """Every rank writes its shards; rank 0 the plain part too. Ray Train puts every rank's
        files in the epoch's one folder."""
        folder = new_folder()
        checkpoints.save(Path(folder), self.model, self.optimizer,
                         {**plain, "world_size": self.world} if self.rank == 0 else None)
        return folder

    def load(self, folder: Path) -> dict[str, Any]:
        return checkpoints.load(folder, self.model, self.optimizer)

    def final_state(self) -> dict[str, np.ndarray]:
        """The whole model on rank 0 under local's keys (gathered: every rank takes part)."""
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=True))
        return {k: v.detach().cpu().numpy() for k, v in full.items()}
