"""The ps driver's side: the actors of one attempt (`PSGroup`, the engine's Trainer for ps) and
the communication schedule of an epoch, sync or async. The driver only moves object refs:
every ref goes straight from actor to actor (the replicas' gradient refs are the servers'
`apply` arguments, the servers' weight refs the replicas' next arguments)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from torch import nn

from raydist import memory
from raydist.config import RunSpec
from raydist.data import shard
from raydist.engine import Record, checkpoint
from raydist.runtime.faults import Faults
from raydist.runtime.members import Members
from raydist.runtime.stall import POLL_S, Watchdog, get, wait_all
from raydist.strategies.ps import SERVER_CPUS
from raydist.strategies.ps.actors import Replica, Server
from raydist.strategies.ps.sharding import Part, to_file
from raydist.strategies.ps.staleness import AsyncSchedule, Item

RemoteServer = ray.remote(Server)
RemoteReplica = ray.remote(Replica)
# Not inside the placement group of the process that starts them: a Tune trial's group holds
# only the trial's driver, and Tune has its children captured into it by default.
OWN_PLACE = {"scheduling_strategy": "DEFAULT"}


def lost(e: BaseException) -> bool:
    """An actor died: its own call failed, or a call that read what it made."""
    return isinstance(e, RayActorError) or (isinstance(e, RayTaskError)
                                            and isinstance(e.cause, RayActorError))


@dataclass
class EpochWork:
    applied: list[dict[str, Any]]
    """Stats of the gradients that were applied."""
    discarded: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PSGroup:
    """The actors of one attempt and the refs of the servers' latest weights."""
    spec: RunSpec
    model: nn.Module
    """the driver's copy: its buffers (untouched by ps) complete the final state_dict"""
    servers: list[Any]
    replicas: list[Any]
    weights: list[ray.ObjectRef] = field(default_factory=list)
    members: Members = field(default_factory=lambda: Members("a ps actor"))
    watch: Watchdog = field(default_factory=lambda: Watchdog(RunSpec.stall_timeout_s))
    """every wait on the actors goes through it (raydist/runtime/stall.py)"""

    @classmethod
    def start(cls, spec: RunSpec, model: nn.Module, parts: list[Part], weights: dict[str, np.ndarray],
              optimizer_state: dict[str, Any], scheduler_state: dict[str, Any] | None,
              steps: int) -> PSGroup:
        """Servers from `weights` and the optimizer and lr-schedule state (every server's
        schedule is the same: all step once per update), for a run of `steps` server updates."""
        faults = Faults.of(spec)
        group = cls(spec, model,
                    [RemoteServer.options(num_cpus=SERVER_CPUS, **OWN_PLACE).remote(
                        spec, p, {n: weights[n] for n in p.names},
                        {n: optimizer_state[n] for n in p.names if n in optimizer_state},
                        steps=steps, scheduler_state=scheduler_state)
                     for p in parts],
                    [RemoteReplica.options(num_cpus=spec.threads_per_worker, **OWN_PLACE).remote(
                        spec, i, parts, faults) for i in range(spec.workers)],
                    watch=Watchdog(spec.stall_timeout_s))
        try:
            idents = group.get([a.ready.remote() for a in group.servers + group.replicas])
        except BaseException:
            group.close()
            raise
        names = [f"ps server {i}" for i in range(len(parts))]
        names += [f"ps replica {i}" for i in range(spec.workers)]
        for name, ident in zip(names, idents, strict=True):
            group.members.add(name, ident)
        group.weights = [s.weights.remote() for s in group.servers]
        return group

    def get(self, refs: Any, step: bool = False) -> Any:
        """ray.get under the watchdog; the answer is progress (`step`: a training step)."""
        got = get(refs, self.watch)
        if step:
            self.watch.step()
        else:
            self.watch.alive()
        return got

    # --- the engine's Trainer --------------------------------------------------------------

    def train_epoch(self, epoch: int, batches: list[torch.Tensor]) -> tuple[float, Record]:
        t = time.perf_counter()
        self.weights = [s.train_mode.remote() for s in self.servers]
        work = EPOCHS[self.spec.mode](self, epoch, batches)
        self.weights = [s.eval_mode.remote() for s in self.servers]
        elapsed = time.perf_counter() - t
        return sum(s["loss"] for s in work.applied), {
            **epoch_metrics(work, len(batches), self.spec.workers, elapsed), **self.memory()}

    def memory(self) -> Record:
        """Each replica's and each server's own memory (after the timed steps), and the worst."""
        named = [f"replica {i}" for i in range(len(self.replicas))]
        named += [f"server {i}" for i in range(len(self.servers))]
        got = self.get([a.memory.remote() for a in self.replicas + self.servers])
        return memory.record_fields(dict(zip(named, got, strict=True)))

    def evaluate(self) -> Record:
        return self.get(self.replicas[0].evaluate.remote(*self.weights))

    def save(self, history: list[Record]) -> None:
        checkpoint.write(self.spec.out, {"history": history, **to_file(self.state())})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return state_dict(self.model, self.state()["weights"])

    def close(self) -> None:
        for actor in self.servers + self.replicas:
            ray.kill(actor)

    def who_died(self, e: BaseException) -> str:
        return self.members.who(e)

    # --- moving refs ---------------------------------------------------------------------------

    def grad(self, rank: int, epoch: int, step: int, part: int) -> list[ray.ObjectRef]:
        """[stats, grad for server 0, grad for server 1, ...], read from the latest weights."""
        return self.replicas[rank].gradients.options(num_returns=1 + len(self.servers)).remote(
            epoch, step, part, *self.weights)

    def apply(self, grads: Sequence[Sequence[ray.ObjectRef]]) -> None:
        """grads[r][s]: replica r's gradient for server s; the refs go straight to the servers."""
        self.weights = [s.apply.remote(*(g[i] for g in grads)) for i, s in enumerate(self.servers)]

    def state(self) -> dict[str, Any]:
        states = self.get([s.state.remote() for s in self.servers])
        merged = {key: {k: v for st in states for k, v in st[key].items()}
                  for key in ("weights", "optimizer")}
        return {**merged, "scheduler": states[0]["scheduler"]}


def state_dict(model: nn.Module, weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The servers' tensors under local's keys, copied into the driver's `model` so that a
    parameter the model holds under two names (a tied head) is right under both; buffers,
    untouched by ps, are the model's own."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.tensor(weights[name]))  # a copy: object-store arrays are read-only
    return {k: v.detach().clone() for k, v in model.state_dict().items()}




def sync_epoch(group: PSGroup, epoch: int, batches: list[torch.Tensor]) -> EpochWork:
    """Every step: all gradients -> each server sums and steps once -> new weights to all.
    The driver only waits for the stats of the step before the one it has just queued."""
    stats, pending = [], []
    for step in range(len(batches)):
        outs = [group.grad(rank, epoch, step, rank) for rank in range(len(group.replicas))]
        group.apply([out[1:] for out in outs])
        stats += group.get(pending, step=bool(pending))
        pending = [out[0] for out in outs]
    stats += group.get(pending, step=True)
    wait_all(group.weights, group.watch)
    return EpochWork(stats)


def async_epoch(group: PSGroup, epoch: int, batches: list[torch.Tensor]) -> EpochWork:
    """Each gradient is applied alone as it arrives, unless it is too stale."""
    sched = AsyncSchedule(shards(batches, len(group.replicas)), group.spec.max_staleness)
    flying: dict[ray.ObjectRef, tuple[int, Item, int, list[ray.ObjectRef]]] = {}

    def dispatch(rank: int) -> None:
        item = sched.next()
        if item is not None:
            outs = group.grad(rank, epoch, *item)
            flying[outs[0]] = (rank, item, sched.version, outs[1:])

    for rank in range(len(group.replicas)):
        dispatch(rank)
    work = EpochWork([])
    while flying:
        ready, _ = ray.wait(list(flying), num_returns=1, timeout=POLL_S)
        if not ready:
            group.watch.check()
            continue
        rank, item, version, grads = flying.pop(ready[0])
        stats = group.get(ready[0], step=True)
        if sched.finish(item, version):
            group.apply([grads])
            work.applied.append(stats)
        else:
            work.discarded.append(stats)
        dispatch(rank)
    wait_all(group.weights, group.watch)
    return work


def shards(batches: list[torch.Tensor], world: int) -> list[Item]:
    """(step, part) of every non-empty shard of the epoch: async's queue."""
    return [(step, part) for step, b in enumerate(batches) for part in range(world)
            if len(shard(b, part, world))]


EPOCHS: dict[str, Callable[[PSGroup, int, list[torch.Tensor]], EpochWork]] = {
    "sync": sync_epoch, "async": async_epoch}
SERVER_STEPS: dict[str, Callable[[list[torch.Tensor], int], int]] = {
    "sync": lambda batches, world: len(batches),  # one update per global batch
    # one per applied gradient: a discarded one's shard is recomputed and applied later
    "async": lambda batches, world: len(shards(batches, world))}
"""Optimizer (and lr schedule) steps of every server in one epoch, by mode."""


def epoch_metrics(work: EpochWork, steps: int, workers: int, elapsed: float) -> Record:
    """bytes_per_step: gradients up plus weights down per global batch, as measured by the
    replicas (discarded gradients count: they were sent). compute_s: a replica's mean busy time;
    comm_wait_s: the rest of the epoch, spent moving tensors or waiting."""
    every = work.applied + work.discarded
    compute = sum(s["busy_s"] for s in every) / workers
    return {"world_size": workers, "bytes_per_step": sum(s["bytes"] for s in every) / steps,
            "compute_s": compute,
            "comm_wait_s": max(0.0, elapsed - compute), "discarded": len(work.discarded)}
