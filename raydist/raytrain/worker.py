"""One Ray Train worker of any strategy on Ray Train: the skeleton of a strategy's per-rank side
(`RayTrainReplica`), the engine's epoch loop around it, the stop broadcast, each worker's memory
gathered into rank 0's record, checkpoints through Ray Train, and the RNG states a checkpoint
holds."""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointUploadMode
from ray.train.torch import get_device

from raydist import memory
from raydist.config import RunSpec
from raydist.data import Dataset
from raydist.engine import (
    Diverged,
    Record,
    evaluate,
    fit,
    levers,
    make_optimizer,
    make_scheduler,
    restore_scheduler,
    total_steps,
)
from raydist.engine.levers import Levers
from raydist.models import build_model
from raydist.registry import import_object
from raydist.runtime import ray_compat
from raydist.runtime.faults import Faults
from raydist.runtime.stall import BEAT_S, Beats

RAY_CALL_S = 60.0  # bound on any single call to the channel actor


def place() -> tuple[int, int, torch.device]:
    """This worker's rank, the group's size and its device, from Ray Train's context."""
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size(), get_device()


class Stopped(Exception):
    """The driver asked the workers to stop (its `report` raised, or it was interrupted)."""


class RayTrainReplica(abc.ABC):
    """A strategy's per-rank side, built as cls(spec, data, faults) in each Ray Train worker (its
    Recipe names the class) and driven as the engine's Trainer (train_epoch, evaluate, save).

    The skeleton is written once, here: this rank's place (rank, world, device), the model as
    the strategy holds it (`distribute`), the optimizer (`make_rule`, then `wrap`) and its lr
    schedule, the latest checkpoint Ray Train registered restored (`history`: its records; the
    strategy's files read by `load`), the data on this rank's device. A checkpoint holds the
    plain part written here (epoch, history, lr schedule, RNG states) and the strategy's own
    (`write`). A strategy writes only what differs: those methods, `train_epoch`, and where
    its model is not plain, `evaluate`, `final_state` and `measure`."""

    def __init__(self, spec: RunSpec, data: Dataset, faults: Faults) -> None:
        self.rank, self.world, self.device = place()
        self.spec, self.faults = spec, faults
        self.levers = Levers.of(spec)  # before distribute and wrap, which may set its reduce
        # checkpointing and compile before the strategy wraps or shards the blocks
        self.model = self.distribute(levers.apply(build_model(spec, data), spec))
        # the schedule drives the rule itself, under whatever wraps it
        self.rule = self.make_rule()
        self.scheduler = make_scheduler(spec, self.rule, total_steps(spec, data))
        self.optimizer = self.wrap(self.rule)
        self.history = self.restore()
        self.data = on_device(data.in_worker(ray.train.get_dataset_shard), self.device)

    @abc.abstractmethod
    def distribute(self, model: torch.nn.Module) -> torch.nn.Module:
        """The freshly built model (the same weights on every rank) as this rank holds it: on
        its device, converted, sharded or split."""

    def make_rule(self) -> torch.optim.Optimizer:
        """The optimizer over the parameters as this rank holds them, under the model's names."""
        return make_optimizer(self.spec, self.model.named_parameters())

    def wrap(self, rule: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """What steps the rule in training (before a checkpoint loads into it): by default itself."""
        return rule

    @abc.abstractmethod
    def train_epoch(self, epoch: int, batches: list[torch.Tensor]) -> tuple[float, Record]:
        """The engine's Trainer.train_epoch: the loss summed over every rank."""

    def evaluate(self) -> Record:
        return evaluate(self.model, self.data, levers=self.levers)

    def save(self, history: list[Record]) -> None:
        """The epoch's checkpoint: every rank reports the record, with its files where it has
        some (`write`)."""
        rec = history[-1]
        self.faults.maybe_fail(self.rank, rec["epoch"])
        plain = {"epoch": rec["epoch"], "history": history, "rng": rng_states(),
                 "scheduler": self.scheduler.state_dict()}
        report(rec, self.write(plain))

    @abc.abstractmethod
    def write(self, plain: dict[str, Any]) -> str | None:
        """This rank's files of the checkpoint, with `plain` (the records, the lr schedule, this
        rank's RNG states) where the strategy keeps it: a fresh folder (new_folder) holding
        them, or None (none from this rank)."""

    def restore(self) -> list[Record]:
        """The latest checkpoint Ray Train registered, if any, loaded; returns its records."""
        with latest() as folder:
            if folder is None:
                return []
            plain = self.load(folder)
        restore_scheduler(self.scheduler, plain.get("scheduler"))
        set_rng_states(plain["rng"])
        return plain["history"]

    @abc.abstractmethod
    def load(self, folder: Path) -> dict[str, Any]:
        """Load this rank's part of the checkpoint in `folder` into the model and the optimizer;
        returns the plain part `write` kept."""

    def final_state(self) -> dict[str, np.ndarray]:
        """The model under local's keys (every rank calls it: it may gather shards)."""
        return {k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()}

    def measure(self) -> dict[str, int]:
        """This process's memory fields for the record (raydist.memory.measure)."""
        return memory.measure(self.model, self.optimizer)


class Measured:
    """The replica as the epoch loop sees it: each epoch's record also holds every worker's
    memory (raydist.memory.measure after the epoch, gathered to every rank): the worst of each
    field, and `per_worker_memory`, one entry per rank. With `beats` (rank 0), the driver's
    watchdog hears of the steps as they finish (raydist/runtime/stall.py)."""

    def __init__(self, replica: RayTrainReplica, beats: Beats | None = None) -> None:
        self.replica, self.beats = replica, beats

    def train_epoch(self, epoch: int, batches: list[torch.Tensor]) -> tuple[float, Record]:
        steps = self.beats.over(batches) if self.beats else batches
        loss, rec = self.replica.train_epoch(epoch, steps)
        norms = self.replica.levers.take()  # the global norm: the same on every rank
        mine = self.replica.measure()
        every = gather(mine, self.replica.world)
        per_worker = [{"worker": f"rank {r}", **m} for r, m in enumerate(every)]
        return loss, {**rec, **norms, **memory.worst(every), "per_worker_memory": per_worker}

    def evaluate(self) -> Record:
        return self.replica.evaluate()

    def save(self, history: list[Record]) -> None:
        self.replica.save(history)


def gather(obj: Any, world: int) -> list[Any]:
    """`obj` of every rank, in rank order (gloo or nccl: all_gather_object pickles it)."""
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def total(values: list[float], world: int, device: torch.device) -> list[float]:
    """Each value summed over the ranks (every rank sends the same payload)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """One replica; rank 0's return value reaches the driver as the result."""
    spec: RunSpec = config["spec"]
    ray_compat.quiet_train_reports()  # keep the console for the per-epoch progress lines
    torch.set_num_threads(spec.threads_per_worker)
    make: Callable[..., RayTrainReplica] = import_object(config["replica"], "replica")
    me = make(spec, config["data"], config["faults"])
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
        # a fire-and-forget call at most every BEAT_S (or a quarter of the watchdog's limit)
        beats = Beats(config["channel"].beat.remote, min(BEAT_S, spec.stall_timeout_s / 4))
        history = fit(spec, me.data, Measured(me, beats if me.rank == 0 else None), publish, me.history)
    except Diverged as e:  # every rank sees the same all-reduced loss, so all stop here
        return {"diverged": str(e)}
    except Stopped:
        return None
    return {"diverged": None, "history": history, "state": me.final_state()}


def on_device(data: Dataset, device: torch.device) -> Dataset:
    if device.type == "cpu":
        return data
    tensors = ("x_train", "y_train", "x_val", "y_val")
    return dataclasses.replace(data, **{k: getattr(data, k).to(device) for k in tensors})


def report(rec: Record, folder: str | None) -> None:
    """Every rank reports each epoch (Ray Train pairs the reports up); a rank with files to keep
    gives their `folder` (a fresh temporary one: Ray deletes it after the upload), and Ray Train
    puts every rank's files in the epoch's one checkpoint folder. Uploads run in the background:
    Ray Train's report queue holds one entry until the controller polls it, and training should
    not wait for that."""
    mode = {"checkpoint_upload_mode": CheckpointUploadMode.ASYNC}
    if folder is None:
        ray.train.report(rec, **mode)
        return
    ray.train.report(rec, checkpoint=Checkpoint.from_directory(folder),
                     delete_local_checkpoint_after_upload=True, **mode)


def new_folder() -> str:
    return tempfile.mkdtemp(prefix="raydist_ckpt_")


@contextlib.contextmanager
def latest() -> Iterator[Path | None]:
    """The folder of the latest checkpoint Ray Train registered, while it is read (None: a fresh
    run)."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        yield None
        return
    with ckpt.as_directory() as d:
        yield Path(d)


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
