"""One pipeline stage (a Ray actor): some contiguous blocks of the model, their optimizer, and
the point-to-point communication with its neighbours over a gloo process group of the stage
actors; the math and the messages side by side, per micro-batch."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist
from torch import nn

from raydist.cluster import free_port
from raydist.config import RunSpec
from raydist.engine import denominator, loss_fn, make_optimizer
from raydist.faults import Faults
from raydist.optim import OPTIMIZERS
from raydist.strategies.pipeline.cuts import Shape
from raydist.strategies.pipeline.schedules import SCHEDULES

STEP_TIMEOUT_S = 600.0
"""Bound on one global batch (and on any other wait on the stages): a hung stage surfaces."""


# --- communication: a gloo process group among the stages, point to point -----------------------

def node_address() -> tuple[str, int]:
    """This node's address and a port free on it: where the other stages find stage 0."""
    ip = ray.util.get_node_ip_address()
    return ip, free_port(ip)


def on_cpu(state: Any) -> Any:
    """A state dict with every tensor on the CPU: the driver need not have a GPU."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: on_cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [on_cpu(v) for v in state]
    return state


# --- one stage: its blocks, their optimizer, the activations waiting for their backward ---------

class Stage:
    """Ray actor holding some contiguous blocks of the model and the optimizer of their
    parameters. The first stage also holds the training inputs, the last one the targets, so
    that per step only the micro-batches' sample indices travel from the driver."""

    def __init__(self, spec: RunSpec, index: int, stages: int, layers: nn.Sequential, names: list[str],
                 task: str, x: torch.Tensor | None, y: torch.Tensor | None, incoming: Shape,
                 faults: Faults) -> None:
        torch.set_num_threads(spec.threads_per_worker)
        self.faults = faults
        # Ray sets CUDA_VISIBLE_DEVICES to the GPU it gave this actor, if any.
        self.device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        self.spec, self.index, self.stages, self.task = spec, index, stages, task
        self.layers, self.incoming = layers.to(self.device), incoming
        self.x, self.y = (None if t is None else t.to(self.device) for t in (x, y))
        self.first, self.last = index == 0, index == stages - 1
        # names: its parameters' names in the whole model (muon splits by them)
        self.optimizer = make_optimizer(spec, zip(names, layers.parameters(), strict=True))
        self.entry = OPTIMIZERS[spec.optimizer]
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        """micro-batch -> (input, output; the scaled loss on the last stage) until its backward"""
        self.sending: list[tuple[dist.Work, torch.Tensor]] = []
        """sends under way, with their buffers, until the step's end"""
        self.reset()

    def address(self) -> tuple[str, int]:
        return node_address()

    def join(self, ip: str, port: int) -> None:
        """Enter the stages' process group (blocks until every stage has)."""
        dist.init_process_group("gloo", init_method=f"tcp://{ip}:{port}", rank=self.index,
                                world_size=self.stages, timeout=timedelta(seconds=STEP_TIMEOUT_S))

    def reset(self) -> None:
        self.loss, self.peak, self.sent = 0.0, 0, 0
        self.clock = {"compute_s": 0.0, "comm_s": 0.0}

    @contextmanager
    def timed(self, kind: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.clock[kind] += time.perf_counter() - t

    def receive(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        """Blocks until the neighbour's tensor is here (its compute included: the bubble)."""
        buffer = torch.empty(shape, dtype=dtype)
        with self.timed("comm_s"):
            dist.recv(buffer, src)
        return buffer.to(self.device)

    def transmit(self, t: torch.Tensor, dst: int) -> None:
        # isend: a blocking send waits for the matching receive, and under 1F1B neighbours send
        # to each other at the same time (ray.util.collective's gloo send is such a blocking one)
        buffer = t.detach().to("cpu").contiguous()
        self.sent += buffer.nbytes
        with self.timed("comm_s"):
            self.sending.append((dist.isend(buffer, dst), buffer))

    def forward(self, mb: int, idx: torch.Tensor, batch_size: int) -> None:
        if self.first:
            x = self.x[idx]
        else:
            shape, dtype = self.incoming
            x = self.receive((len(idx), *shape), dtype, self.index - 1).requires_grad_()
        with self.timed("compute_s"):
            out = self.layers(x)
            if self.last:
                total = loss_fn(self.task)(out, self.y[idx])
                self.loss += total.item()
                out = total / denominator(batch_size)  # the micro-batches' gradients add up
        self.saved[mb] = (x, out)
        self.peak = max(self.peak, len(self.saved))
        if not self.last:
            self.transmit(out, self.index + 1)

    def backward(self, mb: int) -> None:
        x, out = self.saved.pop(mb)
        grad = None if self.last else self.receive(out.shape, out.dtype, self.index + 1)
        with self.timed("compute_s"):
            out.backward(grad)  # accumulates into .grad: the sum over micro-batches
        if not self.first:
            self.transmit(x.grad, self.index - 1)

    def train_step(self, epoch: int, micro: list[np.ndarray], batch_size: int) -> None:
        """One global batch (each micro-batch's sample indices): this stage's ops in schedule
        order, then the flush (all micro-batches' gradients are in: step once per global batch)."""
        self.faults.maybe_fail(self.index, epoch)
        for op, i in SCHEDULES[self.spec.schedule](self.index, self.stages, len(micro)):
            if op == "F":
                self.forward(i, torch.tensor(micro[i]), batch_size)
            else:
                self.backward(i)
        with self.timed("comm_s"):
            for work, _ in self.sending:
                work.wait()
        self.sending.clear()
        with self.timed("compute_s"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def train_mode(self) -> None:
        """Before an epoch's steps: the weights gradients are taken at (schedule-free: y)."""
        self.entry.train(self.optimizer)

    def eval_mode(self) -> None:
        """After them: the weights to evaluate and checkpoint (schedule-free: x)."""
        self.entry.eval(self.optimizer)

    def epoch_stats(self) -> dict[str, float]:
        """Sum of losses (last stage), compute and communication seconds, the most activations
        held at once and the bytes sent, since the last call."""
        stats = {"loss": self.loss, "peak": self.peak, "sent": self.sent, **self.clock}
        self.reset()
        return stats

    def state(self) -> dict[str, Any]:
        return on_cpu({"model": self.layers.state_dict(), "optimizer": self.optimizer.state_dict()})

    def load(self, state: dict[str, Any]) -> None:
        self.layers.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
