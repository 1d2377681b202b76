"""The parameter server's two actors, the math only: `Server` owns some tensors' fp32 master
weights and their optimizer; `Replica` holds the model and the data and turns weights into
the gradient of one shard of a global batch. Plain classes, made remote by the driver."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from raydist import engine, memory
from raydist.config import RunSpec
from raydist.data import load_data, shard
from raydist.engine import Record
from raydist.models import build_model
from raydist.optim import OPTIMIZERS
from raydist.runtime.faults import Faults
from raydist.strategies.ps import sharding
from raydist.strategies.ps.sharding import Part


class Server:
    """Owns `part`: fp32 master weights in one flat buffer (the parameters are views of it), the
    optimizer over them and its lr schedule over `steps` updates (the run's server steps)."""

    def __init__(self, spec: RunSpec, part: Part, weights: dict[str, np.ndarray],
                 optimizer_state: dict[str, Any] | None = None, *, steps: int,
                 scheduler_state: dict[str, Any] | None = None) -> None:
        torch.set_num_threads(1)
        self.part, self.codec = part, sharding.CODECS[spec.comm_dtype]
        self.flat = torch.from_numpy(np.concatenate(
            [np.asarray(weights[n], dtype=np.float32).reshape(-1) for n in part.names]))
        self.params = [nn.Parameter(v) for v in part.views(self.flat)]
        self.optimizer = engine.make_optimizer(spec, zip(part.names, self.params, strict=True))
        self.entry = OPTIMIZERS[spec.optimizer]
        if optimizer_state:
            sharding.load_state(self.optimizer, part.names, optimizer_state)
        self.scheduler = engine.make_scheduler(spec, self.optimizer, steps)
        engine.restore_scheduler(self.scheduler, scheduler_state)

    def ready(self) -> tuple[str, int]:
        """Up and running: its actor id and pid (the driver names a dead actor by them)."""
        from raydist.runtime.members import whoami  # only ever called as an actor, in Ray

        return whoami()

    def weights(self) -> np.ndarray:
        return self.codec.encode(self.flat)

    def train_mode(self) -> np.ndarray:
        """Before an epoch's steps: the weights gradients are taken at (schedule-free: y)."""
        self.entry.train(self.optimizer)
        return self.weights()

    def eval_mode(self) -> np.ndarray:
        """After them: the weights to evaluate and checkpoint (schedule-free: x)."""
        self.entry.eval(self.optimizer)
        return self.weights()

    def apply(self, *grads: np.ndarray) -> np.ndarray:
        """Sum the replicas' gradients (in replica order), step (the lr schedule too), return the
        new weights."""
        total = np.zeros(self.part.size, dtype=np.float32)
        for g in grads:
            total += self.codec.decode(g)
        for p, g in zip(self.params, self.part.views(torch.from_numpy(total)), strict=True):
            p.grad = g
        self.optimizer.step()
        self.scheduler.step()
        for p in self.params:  # the sum is not needed until the next one: a server holds w + state
            p.grad = None
        return self.weights()

    def memory(self) -> dict[str, int]:
        """Its memory fields (raydist/memory/): the master weights and the optimizer state."""
        return memory.measure(nn.ParameterList(self.params), self.optimizer)

    def state(self) -> dict[str, Any]:
        return {"weights": {n: v.detach().numpy().copy()
                            for n, v in zip(self.part.names, self.part.views(self.flat), strict=True)},
                "optimizer": sharding.numpy_state(self.optimizer, self.part.names),
                "scheduler": self.scheduler.state_dict()}


class Replica:
    """Holds the model and the data; turns weights into the gradient of one shard of a batch."""

    def __init__(self, spec: RunSpec, index: int, parts: list[Part], faults: Faults) -> None:
        torch.set_num_threads(spec.threads_per_worker)
        self.spec, self.index, self.parts, self.faults = spec, index, parts, faults
        self.codec = sharding.CODECS[spec.comm_dtype]
        self.data = load_data(spec)
        self.model = build_model(spec, self.data)
        named = dict(self.model.named_parameters())
        self.params = [[named[n] for n in part.names] for part in parts]
        self._batches: tuple[int, list[torch.Tensor]] = (0, [])
        self.held: dict[str, int] | None = None
        """model state while it holds a gradient (measured once per epoch: `memory`)"""

    def ready(self) -> tuple[str, int]:
        """Up and running: its actor id and pid (the driver names a dead actor by them)."""
        from raydist.runtime.members import whoami  # only ever called as an actor, in Ray

        return whoami()

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
        self.faults.maybe_fail(self.index, epoch)
        t = time.perf_counter()
        received = self.load(weights)
        batch = self.batches(epoch)[step]
        idx = shard(batch, part, self.spec.workers)
        self.model.zero_grad(set_to_none=True)
        # a short last batch can leave a shard empty: its gradient is zero, its loss 0
        x, y = self.data.x_train[idx], self.data.y_train[idx]
        denom = engine.denominator(len(batch))  # the servers SUM the replicas' gradients
        loss = engine.backward(self.model, x, y, self.data.task, denom) if len(idx) else 0.0
        if self.held is None and len(idx):  # weights + gradients, as every non-empty shard holds
            self.held = memory.state_bytes(self.model)
        grads = [self.codec.encode(torch.cat([p.grad.reshape(-1) if p.grad is not None
                                              else torch.zeros(p.numel()) for p in params]))
                 for params in self.params]
        self.faults.straggle(self.index, time.perf_counter() - t)
        stats = {"loss": loss, "bytes": received + sum(g.nbytes for g in grads),
                 "busy_s": time.perf_counter() - t}
        return (stats, *grads)

    def memory(self) -> dict[str, int]:
        """Its memory fields (raydist/memory/) for the epoch just trained: weights and
        gradients as a step held them, its peak memory now."""
        measured = memory.measure(self.model)
        measured.update(self.held or {})
        self.held = None
        return measured

    def evaluate(self, *weights: np.ndarray) -> Record:
        self.load(weights)
        return engine.evaluate(self.model, self.data)
