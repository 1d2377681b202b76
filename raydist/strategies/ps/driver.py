"""`ps`: a parameter server on Ray actors.

`workers` replica actors hold the model and the data; each computes the gradient of its shard
of a global batch. `servers` parameter-server actors each own whole tensors of the model
(balanced by size), the fp32 master copy of them and the optimizer state for them; optimizers
act per tensor, so S servers stepping their own tensors equal one optimizer over all of them.

- sync:  every step all replicas' gradients go to the servers, which sum them and step once,
         and every replica reads the new weights. Replicas scale their loss by the GLOBAL batch,
         so the sum is the global-mean gradient: the run equals `local` to float32 round-off.
- async: (Downpour) the shards of an epoch's batches are a queue; whichever replica is free takes
         the next one, and its gradient is applied alone, against whatever weights are current.
         A gradient computed on weights more than `max_staleness` updates old is discarded and
         its shard recomputed on fresh weights (raydist/staleness.py). A slow replica
         (`straggler`) no longer holds the others back: they simply take more shards.

Communication is kept apart from the math: `Server` and `Replica` are plain classes (the math:
engine.backward and the optimizer step); the functions under "driver" are the schedule, which
only moves object refs. Tensors travel as flat numpy arrays, one per server, in `comm_dtype`
(zero-copy reads from the object store), and every ref goes straight from actor to actor: the
replicas' gradient refs are the servers' `apply` arguments, the servers' weight refs the
replicas' next arguments. numpy has no bfloat16: bfloat16 travels as its uint16 bit pattern (the
upper half of the float32, rounded to nearest even). Servers keep fp32 master weights whatever
the wire dtype.

Faults: after every epoch the driver writes spec.out/checkpoint.pt (weights, optimizer state by
tensor name, metrics history). When an actor dies, every actor is replaced and the run resumes from
that checkpoint, at most `max_failures` times; batch order depends only on (seed, epoch), so a
resumed sync run ends bit for bit where an uninterrupted one does. A new run whose `out` holds a
checkpoint of the same spec resumes from it, finished or not.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from torch import nn

from raydist import checkpoint, cluster, engine, sharding
from raydist.config import ConfigError, RunSpec
from raydist.data import Dataset, load_data, shard
from raydist.engine import Record, Report, RunResult
from raydist.faults import maybe_fail
from raydist.models import build_model
from raydist.optim import OPTIMIZERS
from raydist.sharding import Part, split_model
from raydist.staleness import AsyncSchedule, Item

SERVER_CPUS = 0.5
"""A server only sums and steps: half a CPU lets 2 replicas and 2 servers share 3 CPUs."""
WAIT_S = 300.0
"""The longest any single wait on Ray may take before the run is declared stuck."""
RESUMABLE = ("epochs", "out", "address", "max_failures", "threads_per_worker", "straggler", "use_gpu")
"""Fields that may differ between a checkpoint's spec and the run resuming from it."""


# --- the actors: the math ----------------------------------------------------------------------

class Server:
    """Owns `part`: fp32 master weights in one flat buffer (the parameters are views of it), and
    the optimizer over them."""

    def __init__(self, spec: RunSpec, part: Part, weights: dict[str, np.ndarray],
                 optimizer_state: dict[str, Any] | None = None) -> None:
        torch.set_num_threads(1)
        self.part, self.codec = part, sharding.CODECS[spec.comm_dtype]
        self.flat = torch.from_numpy(np.concatenate(
            [np.asarray(weights[n], dtype=np.float32).reshape(-1) for n in part.names]))
        self.params = [nn.Parameter(v) for v in part.views(self.flat)]
        self.optimizer = engine.make_optimizer(spec, self.params)
        if optimizer_state:
            sharding.load_state(self.optimizer, part.names, optimizer_state)

    def ready(self) -> bool:
        return True

    def weights(self) -> np.ndarray:
        return self.codec.encode(self.flat)

    def apply(self, *grads: np.ndarray) -> np.ndarray:
        """Sum the replicas' gradients (in replica order), step, return the new weights."""
        total = np.zeros(self.part.size, dtype=np.float32)
        for g in grads:
            total += self.codec.decode(g)
        for p, g in zip(self.params, self.part.views(torch.from_numpy(total)), strict=True):
            p.grad = g
        self.optimizer.step()
        return self.weights()

    def state(self) -> dict[str, Any]:
        return {"weights": {n: v.detach().numpy().copy()
                            for n, v in zip(self.part.names, self.part.views(self.flat), strict=True)},
                "optimizer": sharding.numpy_state(self.optimizer, self.part.names)}


class Replica:
    """Holds the model and the data; turns weights into the gradient of one shard of a batch."""

    def __init__(self, spec: RunSpec, index: int, parts: list[Part], fault: str | None = None) -> None:
        if fault:  # the test fault knob, set in the driver's environment, not this worker's
            os.environ["RAYDIST_FAULT"] = fault
        torch.set_num_threads(spec.threads_per_worker)
        self.spec, self.index, self.parts = spec, index, parts
        self.codec = sharding.CODECS[spec.comm_dtype]
        self.data = load_data(spec)
        self.model = build_model(spec, self.data)
        named = dict(self.model.named_parameters())
        self.params = [[named[n] for n in part.names] for part in parts]
        self._batches: tuple[int, list[torch.Tensor]] = (0, [])

    def ready(self) -> bool:
        return True

    def load(self, weights: Sequence[np.ndarray]) -> int:
        """Copy the servers' weights into the model; returns the bytes received."""
        for part, params, w in zip(self.parts, self.params, weights, strict=True):
            flat = self.codec.decode(w)
            for p, (a, b) in zip(params, part.bounds, strict=True):
                np.copyto(p.detach().view(-1).numpy(), flat[a:b])
        return sum(w.nbytes for w in weights)

    def batches(self, epoch: int) -> list[torch.Tensor]:
        if self._batches[0] != epoch:
            self._batches = (epoch, engine.global_batches(self.spec, self.data, epoch))
        return self._batches[1]

    def gradients(self, epoch: int, step: int, part: int, *weights: np.ndarray) -> tuple[Any, ...]:
        """Gradient of shard `part` of batch `step`, scaled by the GLOBAL batch size, one array
        per server; first comes a small dict of stats (loss, bytes moved, busy seconds)."""
        maybe_fail(self.spec.out, self.index, epoch)
        t = time.perf_counter()
        received = self.load(weights)
        batch = self.batches(epoch)[step]
        idx = shard(batch, part, self.spec.workers)
        self.model.zero_grad(set_to_none=True)
        # a short last batch can leave a shard empty: its gradient is zero, its loss 0
        x, y = self.data.x_train[idx], self.data.y_train[idx]
        loss = engine.backward(self.model, x, y, self.data.task, len(batch)) if len(idx) else 0.0
        grads = [self.codec.encode(torch.cat([p.grad.reshape(-1) if p.grad is not None
                                              else torch.zeros(p.numel()) for p in params]))
                 for params in self.params]
        if self.index == 0 and self.spec.straggler > 1:
            time.sleep((self.spec.straggler - 1) * (time.perf_counter() - t))
        stats = {"loss": loss, "bytes": received + sum(g.nbytes for g in grads),
                 "busy_s": time.perf_counter() - t}
        return (stats, *grads)

    def evaluate(self, *weights: np.ndarray) -> Record:
        self.load(weights)
        return engine.evaluate(self.model, self.data)


# --- driver: the communication schedule --------------------------------------------------------

RemoteServer = ray.remote(Server)
RemoteReplica = ray.remote(Replica)


class ActorFailed(RuntimeError):
    """An actor died more often than `max_failures` allows."""


def _get(refs: Any) -> Any:
    try:
        return ray.get(refs, timeout=WAIT_S)
    except GetTimeoutError:
        raise RuntimeError(f"ps: no answer from the actors in {WAIT_S:g} s; is the cluster "
                           "overloaded?") from None


def _wait_all(refs: list[ray.ObjectRef]) -> None:
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=WAIT_S, fetch_local=False)
    if len(done) < len(refs):
        raise RuntimeError(f"ps: the servers did not finish a step in {WAIT_S:g} s")


@dataclass
class Group:
    """The actors of one attempt and the refs of the servers' latest weights."""
    servers: list[Any]
    replicas: list[Any]
    weights: list[ray.ObjectRef] = field(default_factory=list)

    @classmethod
    def start(cls, spec: RunSpec, parts: list[Part], weights: dict[str, np.ndarray],
              optimizer_state: dict[str, Any]) -> Group:
        fault = os.environ.get("RAYDIST_FAULT")
        group = cls(
            [RemoteServer.options(num_cpus=SERVER_CPUS).remote(
                spec, p, {n: weights[n] for n in p.names},
                {n: optimizer_state[n] for n in p.names if n in optimizer_state})
             for p in parts],
            [RemoteReplica.options(num_cpus=spec.threads_per_worker).remote(spec, i, parts, fault)
             for i in range(spec.workers)])
        try:
            _get([a.ready.remote() for a in group.servers + group.replicas])
        except BaseException:
            group.kill()
            raise
        group.weights = [s.weights.remote() for s in group.servers]
        return group

    def grad(self, rank: int, epoch: int, step: int, part: int) -> list[ray.ObjectRef]:
        """[stats, grad for server 0, grad for server 1, ...], read from the latest weights."""
        return self.replicas[rank].gradients.options(num_returns=1 + len(self.servers)).remote(
            epoch, step, part, *self.weights)

    def apply(self, grads: Sequence[Sequence[ray.ObjectRef]]) -> None:
        """grads[r][s]: replica r's gradient for server s; the refs go straight to the servers."""
        self.weights = [s.apply.remote(*(g[i] for g in grads)) for i, s in enumerate(self.servers)]

    def state(self) -> dict[str, Any]:
        states = _get([s.state.remote() for s in self.servers])
        return {key: {k: v for st in states for k, v in st[key].items()}
                for key in ("weights", "optimizer")}

    def kill(self) -> None:
        for actor in self.servers + self.replicas:
            ray.kill(actor)


@dataclass
class EpochWork:
    applied: list[dict[str, Any]]
    """Stats of the gradients that were applied."""
    discarded: list[dict[str, Any]] = field(default_factory=list)


def sync_epoch(spec: RunSpec, group: Group, epoch: int, batches: list[torch.Tensor]) -> EpochWork:
    """Every step: all gradients -> each server sums and steps once -> new weights to all.
    The driver only waits for the stats of the step before the one it has just queued."""
    stats, pending = [], []
    for step in range(len(batches)):
        outs = [group.grad(rank, epoch, step, rank) for rank in range(len(group.replicas))]
        group.apply([out[1:] for out in outs])
        stats += _get(pending)
        pending = [out[0] for out in outs]
    stats += _get(pending)
    _wait_all(group.weights)
    return EpochWork(stats)


def async_epoch(spec: RunSpec, group: Group, epoch: int, batches: list[torch.Tensor]) -> EpochWork:
    """Each gradient is applied alone as it arrives, unless it is too stale."""
    world = len(group.replicas)
    sched = AsyncSchedule([(step, part) for step, b in enumerate(batches) for part in range(world)
                           if len(shard(b, part, world))], spec.max_staleness)
    flying: dict[ray.ObjectRef, tuple[int, Item, int, list[ray.ObjectRef]]] = {}

    def dispatch(rank: int) -> None:
        item = sched.next()
        if item is not None:
            outs = group.grad(rank, epoch, *item)
            flying[outs[0]] = (rank, item, sched.version, outs[1:])

    for rank in range(world):
        dispatch(rank)
    work = EpochWork([])
    while flying:
        ready, _ = ray.wait(list(flying), num_returns=1, timeout=WAIT_S)
        if not ready:
            raise RuntimeError(f"ps: no gradient arrived in {WAIT_S:g} s")
        rank, item, version, grads = flying.pop(ready[0])
        stats = _get(ready[0])
        if sched.finish(item, version):
            group.apply([grads])
            work.applied.append(stats)
        else:
            work.discarded.append(stats)
        dispatch(rank)
    _wait_all(group.weights)
    return work


EPOCHS: dict[str, Callable[[RunSpec, Group, int, list[torch.Tensor]], EpochWork]] = {
    "sync": sync_epoch, "async": async_epoch}


def epoch_metrics(work: EpochWork, steps: int, workers: int, elapsed: float) -> Record:
    """bytes_per_step: gradients up plus weights down per global batch, as measured by the
    replicas (discarded gradients count: they were sent). compute_s: a replica's mean busy time;
    comm_wait_s: the rest of the epoch, spent moving tensors or waiting."""
    every = work.applied + work.discarded
    compute = sum(s["busy_s"] for s in every) / workers
    return {"bytes_per_step": sum(s["bytes"] for s in every) / steps, "compute_s": compute,
            "comm_wait_s": max(0.0, elapsed - compute), "discarded": len(work.discarded)}


def train(spec: RunSpec, data: Dataset, group: Group, history: list[Record],
          report: Report) -> list[Record]:
    """Epochs len(history)+1 .. spec.epochs; a checkpoint after each, before it is reported."""
    start = time.perf_counter() - (history[-1]["wall_time_s"] if history else 0.0)
    for epoch in range(len(history) + 1, spec.epochs + 1):
        batches = engine.global_batches(spec, data, epoch)
        t = time.perf_counter()
        work = EPOCHS[spec.mode](spec, group, epoch, batches)
        elapsed = time.perf_counter() - t
        val = _get(group.replicas[0].evaluate.remote(*group.weights))
        loss = sum(s["loss"] for s in work.applied)
        rec = engine.make_record(epoch, loss / data.n_train, val, data.n_train, elapsed,
                                 time.perf_counter() - start)
        rec.update(epoch_metrics(work, len(batches), spec.workers, elapsed))
        finite = math.isfinite(rec["train_loss"])
        if finite:
            checkpoint.write(spec.out, {"spec": spec.to_dict(), "history": [*history, rec],
                                        **group.state()})
        history.append(rec)
        report(rec)
        if not finite:
            raise engine.Diverged(f"training loss is {rec['train_loss']} at epoch {epoch}")
    return history


# --- the strategy ------------------------------------------------------------------------------

def check(spec: RunSpec, data: Dataset) -> None:
    tensors = len(list(build_model(spec, data).parameters()))
    if spec.servers > tensors:
        raise ConfigError(f"servers: {spec.servers} parameter servers but the model has only "
                          f"{tensors} parameter tensors; expected servers <= {tensors}")
    batch = data.n_train if OPTIMIZERS[spec.optimizer].full_batch else min(spec.batch_size, data.n_train)
    if spec.workers > batch:
        raise ConfigError(f"workers: {spec.workers} replicas but a global batch holds only {batch} "
                          f"samples; expected workers <= {batch}")


def resume_point(spec: RunSpec, model: nn.Module) -> dict[str, Any]:
    """The checkpoint in spec.out if there is one (it must be of this spec), else the start."""
    saved = checkpoint.resume("ps", spec, RESUMABLE)
    if saved is None:
        return {"history": [], "optimizer": {},
                "weights": {n: p.detach().numpy() for n, p in model.named_parameters()}}
    return saved


def state_dict(model: nn.Module, weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The servers' tensors under local's keys (buffers, untouched by ps, come from `model`)."""
    return {k: torch.tensor(weights[k]) if k in weights else v for k, v in model.state_dict().items()}


def run(spec: RunSpec, report: Report) -> RunResult:
    cluster.connect(spec)
    cluster.require(spec.workers * spec.threads_per_worker + spec.servers * SERVER_CPUS, 0,
                    f"ps ({spec.workers} replicas x {spec.threads_per_worker} CPU + "
                    f"{spec.servers} servers x {SERVER_CPUS:g} CPU)")
    data = load_data(spec)
    model = build_model(spec, data)
    parts = split_model(model, spec.servers)
    restarts = checkpoint.Restarts("ps", spec.max_failures, ActorFailed)
    while True:
        point = resume_point(spec, model)
        history = list(point["history"])
        if len(history) == spec.epochs:
            return RunResult(history, state_dict(model, point["weights"]))
        try:
            group = Group.start(spec, parts, point["weights"], point["optimizer"])
        except RayActorError as e:  # Group.start has killed the actors it started
            restarts.before_start(e)
            continue
        try:
            history = train(spec, data, group, history, report)
            return RunResult(history, state_dict(model, group.state()["weights"]))
        except (RayActorError, RayTaskError) as e:
            if isinstance(e, RayTaskError) and not isinstance(e.cause, RayActorError):
                raise
            restarts.while_training(e)
        finally:
            group.kill()
