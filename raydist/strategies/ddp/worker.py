"""One ddp worker (a Ray Train worker): the engine's epoch loop (raydist.raytrain.worker) on
this rank's shard of every global batch, through DDP with raydist's communication hook;
checkpoints via Ray Train, one state.pt that rank 0 writes."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.train.torch import prepare_model
from torch.optim.lr_scheduler import LRScheduler

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
from raydist.engine.lr import effective_lr
from raydist.models import build_model
from raydist.optim import build_optimizer, training
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
from raydist.strategies.ddp import STATE, syncbn
from raydist.strategies.ddp.comm import Comm


class Replica:
    """This rank's side of the engine's epoch loop (raydist.raytrain.worker.Replica)."""

    def __init__(self, spec: RunSpec, data: Dataset, faults: Faults) -> None:
        self.rank, self.world, self.device = place()
        self.spec, self.faults = spec, faults
        self.model = build_model(spec, data)
        # DDP alone normalises each worker's shard by its own statistics, local the whole batch's;
        # converted before the optimizer is made, so that it holds the converted model's parameters
        if spec.sync_batchnorm and self.world > 1:
            self.model = syncbn.convert(self.model)
        self.link = Comm(spec, self.model, self.world)
        # local SGD wraps the optimizer before the checkpoint loads: its state holds the averager's
        # step; the rule itself is what an epoch switches into training mode
        self.rule = (sharded_optimizer(spec, self.model) if spec.shard_optimizer else
                     make_optimizer(spec, self.model.named_parameters()))
        self.scheduler = make_scheduler(spec, self.rule, total_steps(spec, data))
        self.optimizer = self.link.wrap(self.rule)
        self.model.to(self.device)  # moves the parameters in place: the optimizer still holds them
        self.history = restore(self.model, self.optimizer, self.scheduler)
        self.data = on_device(data.in_worker(ray.train.get_dataset_shard), self.device)
        self.replica = prepare_model(self.model, move_to_device=False,
                                     parallel_strategy_kwargs={"bucket_cap_mb": spec.bucket_cap_mb})
        self.link.attach(self.replica)

    def train_epoch(self, epoch: int, batches: list[torch.Tensor]) -> tuple[float, Record]:
        with training(self.spec.optimizer, self.rule), self.link.stepping(self.replica):
            loss = train_epoch(self.replica, self.optimizer, self.data, batches, self.rank, self.world,
                               self.scheduler)
        sent, wait = self.link.take()
        totals = total([loss, wait], self.world, self.device)  # every rank sends the same payload
        return totals[0], {"world_size": self.world, "comm_wait_s": totals[1] / self.world,
                           "bytes_per_step": 2 * (self.world - 1) * sent / len(batches)}

    def evaluate(self) -> Record:
        return evaluate(self.replica, self.data)

    def save(self, history: list[Record]) -> None:
        self.faults.maybe_fail(self.rank, history[-1]["epoch"])
        save_checkpoint(history, self.model, self.optimizer, self.scheduler, self.rank)

    def final_state(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()}


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


def save_checkpoint(history: list[Record], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: LRScheduler, rank: int) -> None:
    """Rank 0 attaches the checkpoint to its report; the others report the record alone."""
    rec, optim = history[-1], optimizer_state(optimizer, rank)
    if rank != 0:
        report(rec, None)
        return
    state = {"model": model.state_dict(), "optimizer": optim,
             "scheduler": scheduler.state_dict(), "epoch": rec["epoch"], "history": history,
             "rng": rng_states()}
    folder = new_folder()  # Ray deletes it after the upload
    checkpoint.save(Path(folder) / STATE, state)
    report(rec, folder)


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: LRScheduler) -> list[Record]:
    """Load the latest checkpoint Ray Train registered, if any; returns its history."""
    with latest() as folder:
        if folder is None:
            return []
        state = checkpoint.load(folder / STATE)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])  # casts its tensors to the params' device
    restore_scheduler(scheduler, state.get("scheduler"))
    set_rng_states(state["rng"])
    return state["history"]
