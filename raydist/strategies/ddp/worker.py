"""One ddp worker (a Ray Train worker): the engine's epoch loop on this rank's shard of every
global batch, through DDP with raydist's communication hook; checkpoints via Ray Train."""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointUploadMode
from ray.train.torch import get_device, prepare_model
from torch.optim.lr_scheduler import LRScheduler

from raydist import checkpoint, ray_compat
from raydist.config import RunSpec
from raydist.data import Dataset
from raydist.engine import (
    Diverged,
    Record,
    evaluate,
    fit,
    make_optimizer,
    make_scheduler,
    restore_scheduler,
    total_steps,
    train_epoch,
)
from raydist.faults import Faults
from raydist.models import build_model
from raydist.optim import training
from raydist.strategies.ddp import STATE, syncbn
from raydist.strategies.ddp.comm import Comm

RAY_CALL_S = 60.0  # bound on any single call to the channel actor


class Stopped(Exception):
    """The driver asked the workers to stop (its `report` raised, or it was interrupted)."""


class Replica:
    """This rank's side of the engine's epoch loop."""

    def __init__(self, spec: RunSpec, data: Dataset, faults: Faults) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.spec, self.faults, self.device = spec, faults, get_device()
        self.model = build_model(spec, data)
        # DDP alone normalises each worker's shard by its own statistics, local the whole batch's;
        # converted before the optimizer is made, so that it holds the converted model's parameters
        if spec.sync_batchnorm and self.world > 1:
            self.model = syncbn.convert(self.model)
        self.link = Comm(spec, self.model, self.world)
        # local SGD wraps the optimizer before the checkpoint loads: its state holds the averager's
        # step; the rule itself is what an epoch switches into training mode
        self.rule = make_optimizer(spec, self.model.named_parameters())
        self.scheduler = make_scheduler(spec, self.rule, total_steps(spec, data))
        self.optimizer = self.link.wrap(self.rule)
        self.model.to(self.device)  # moves the parameters in place: the optimizer still holds them
        self.history = restore(self.model, self.optimizer, self.scheduler)
        self.data = on_device(data.in_worker(ray.train.get_dataset_shard), self.device)
        self.replica = prepare_model(self.model, move_to_device=False,
                                     parallel_strategy_kwargs={"bucket_cap_mb": spec.bucket_cap_mb})
        self.link.attach(self.replica)

    def train_epoch(self, epoch: int, batches: list[torch.Tensor]) -> tuple[float, Record]:
        with training(self.spec.optimizer, self.rule):
            loss = train_epoch(self.replica, self.optimizer, self.data, batches, self.rank, self.world,
                               self.scheduler)
        sent, wait = self.link.take()
        totals = self.sum([loss, wait])  # every rank sends the same payload: rank 0's counts
        return totals[0], {"world_size": self.world, "comm_wait_s": totals[1] / self.world,
                           "bytes_per_step": 2 * (self.world - 1) * sent / len(batches)}

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def evaluate(self) -> Record:
        return evaluate(self.replica, self.data)

    def save(self, history: list[Record]) -> None:
        self.faults.maybe_fail(self.rank, history[-1]["epoch"])
        save_checkpoint(history, self.model, self.optimizer, self.scheduler, self.rank)


def loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """One replica; rank 0's return value reaches the driver as the result."""
    spec: RunSpec = config["spec"]
    ray_compat.quiet_train_reports()  # keep the console for the per-epoch progress lines
    torch.set_num_threads(spec.threads_per_worker)
    me = Replica(spec, config["data"], config["faults"])
    config["channel"].hello.remote(me.rank, os.getpid())  # named by it if it dies
    stop = torch.zeros(1, device=me.device)

    def publish(rec: Record) -> None:
        if me.rank == 0:
            stop.fill_(float(ray.get(config["channel"].put.remote(rec), timeout=RAY_CALL_S)))
        if me.world > 1:
            dist.broadcast(stop, src=0)  # every rank stops after the same epoch
        if stop.item():
            raise Stopped

    try:
        for rec in me.history:  # a resumed run reports its earlier epochs too
            publish(rec)
        history = fit(spec, me.data, me, publish, me.history)
    except Diverged as e:  # every rank sees the same all-reduced loss, so all stop here
        return {"diverged": str(e)}
    except Stopped:
        return None
    return {"diverged": None, "history": history,
            "state": {k: v.detach().cpu().numpy() for k, v in me.model.state_dict().items()}}


def on_device(data: Dataset, device: torch.device) -> Dataset:
    if device.type == "cpu":
        return data
    tensors = ("x_train", "y_train", "x_val", "y_val")
    return dataclasses.replace(data, **{k: getattr(data, k).to(device) for k in tensors})


def save_checkpoint(history: list[Record], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: LRScheduler, rank: int) -> None:
    """Every rank reports (Ray Train pairs the reports up); rank 0 attaches the checkpoint.
    Uploads run in the background: Ray Train's report queue holds one entry until the
    controller polls it, and training should not wait for that."""
    rec, report = history[-1], {"checkpoint_upload_mode": CheckpointUploadMode.ASYNC}
    if rank != 0:
        ray.train.report(rec, **report)
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "epoch": rec["epoch"], "history": history,
             "rng": rng_states()}
    folder = tempfile.mkdtemp(prefix="raydist_ckpt_")  # Ray deletes it after the upload
    checkpoint.save(Path(folder) / STATE, state)
    ray.train.report(rec, checkpoint=Checkpoint.from_directory(folder),
                     delete_local_checkpoint_after_upload=True, **report)


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: LRScheduler) -> list[Record]:
    """Load the latest checkpoint Ray Train registered, if any; returns its history."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return []
    with ckpt.as_directory() as d:
        state = checkpoint.load(Path(d) / STATE)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])  # casts its tensors to the params' device
    restore_scheduler(scheduler, state.get("scheduler"))
    set_rng_states(state["rng"])
    return state["history"]


def rng_states() -> dict[str, Any]:
    """Every generator's state as plain data (checkpoint.PLAIN): numpy's key array as a list."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": (name, key.tolist(), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    name, key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
