"""One ddp worker (a Ray Train worker): the engine's epoch loop (raydist.raytrain.worker) on
this rank's shard of every global batch, through DDP with raydist's communication hook;
checkpoints via Ray Train, one state.pt that rank 0 writes."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from ray.train.torch import prepare_model

from raydist.config import RunSpec
from raydist.data import Dataset
from raydist.engine import Record, checkpoint, evaluate, make_optimizer, train_epoch
from raydist.engine.lr import effective_lr
from raydist.optim import build_optimizer, training
from raydist.raytrain.worker import RayTrainReplica, new_folder, total
from raydist.runtime.faults import Faults
from raydist.strategies.ddp import STATE, syncbn
from raydist.strategies.ddp.comm import Comm


class DDPReplica(RayTrainReplica):
    """This rank's side of the engine's epoch loop: the whole model, through DDP
    (`self.replica`) with raydist's communication hook (`self.link`)."""

    def __init__(self, spec: RunSpec, data: Dataset, faults: Faults) -> None:
        super().__init__(spec, data, faults)
        self.replica = prepare_model(self.model, move_to_device=False,
                                     parallel_strategy_kwargs={"bucket_cap_mb": self.spec.bucket_cap_mb})
        self.link.attach(self.replica)

    def distribute(self, model: torch.nn.Module) -> torch.nn.Module:
        # DDP alone normalises each worker's shard by its own statistics, local the whole batch's;
        # converted before the optimizer is made, so that it holds the converted model's parameters
        if self.spec.sync_batchnorm and self.world > 1:
            model = syncbn.convert(model)
        self.link = Comm(self.spec, model, self.world)
        return model.to(self.device)

    def make_rule(self) -> torch.optim.Optimizer:
        return (sharded_optimizer(self.spec, self.model) if self.spec.shard_optimizer else
                make_optimizer(self.spec, self.model.named_parameters()))

    def wrap(self, rule: torch.optim.Optimizer) -> torch.optim.Optimizer:
        # local SGD wraps the rule before the checkpoint loads: its state holds the averager's
        # step; the rule itself is what an epoch switches into training mode
        return self.link.wrap(rule)

    def train_epoch(self, epoch: int, batches: list[torch.Tensor]) -> tuple[float, Record]:
        with training(self.spec.optimizer, self.rule), self.link.stepping(self.replica):
            loss = train_epoch(self.replica, self.optimizer, self.data, batches, self.rank, self.world,
                               self.scheduler, self.levers)
        sent, wait = self.link.take()
        totals = total([loss, wait], self.world, self.device)  # every rank sends the same payload
        return totals[0], {"world_size": self.world, "comm_wait_s": totals[1] / self.world,
                           "bytes_per_step": 2 * (self.world - 1) * sent / len(batches)}

    def evaluate(self) -> Record:
        return evaluate(self.replica, self.data, levers=self.levers)

    def write(self, plain: dict[str, Any]) -> str | None:
        """Rank 0 writes the checkpoint, one file; the others report the record alone."""
        optim = optimizer_state(self.optimizer, self.rank)
        if self.rank != 0:
            return None
        folder = new_folder()  # Ray deletes it after the upload
        checkpoint.save(Path(folder) / STATE, {"model": self.model.state_dict(), "optimizer": optim,
                                               **plain})
        return folder

    def load(self, folder: Path) -> dict[str, Any]:
        state = checkpoint.load(folder / STATE)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])  # casts its tensors to the params' device
        return state


def sharded_optimizer(spec: RunSpec, model: torch.nn.Module) -> torch.optim.Optimizer:
    """ZeRO-1: torch's ZeroRedundancyOptimizer around raydist's rule. Each rank keeps the state
    of its share of the parameters (whole tensors, the largest first to the emptiest rank), steps
    that share after DDP's all-reduce and broadcasts it; the same formula as one optimizer over
    the whole model (the rules act on each tensor on its own)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(list(model.parameters()),
                                   optimizer_class=functools.partial(build_optimizer, spec.optimizer),
                                   lr=effective_lr(spec), **spec.optimizer_hparams())


def optimizer_state(optimizer: torch.optim.Optimizer, rank: int) -> dict[str, Any] | None:
    """The whole optimizer's state on rank 0 (None elsewhere): ZeRO's shares are first gathered
    there, a collective every rank joins."""
    consolidate = getattr(optimizer, "consolidate_state_dict", None)
    if consolidate is not None:
        consolidate(to=0)
    return optimizer.state_dict() if rank == 0 else None

