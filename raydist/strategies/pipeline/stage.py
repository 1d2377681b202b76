"""One pipeline stage (a Ray actor): one chunk of contiguous blocks of the model (V chunks under
an interleaved schedule), their optimizer, and the point-to-point communication with its
neighbours over a gloo process group of all stage actors; the math and the messages side by
side, per micro-batch. With replicas (DP x PP), the replicas of one stage position also share a
group (gloo; nccl on GPUs) that sums their gradients before the optimizer steps."""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist
from torch import nn

from raydist import memory
from raydist.config import RunSpec
from raydist.engine import denominator, loss_fn, make_optimizer, make_scheduler, restore_scheduler
from raydist.optim import OPTIMIZERS
from raydist.runtime.faults import Faults
from raydist.runtime.members import whoami
from raydist.strategies.pipeline.cuts import Shape
from raydist.strategies.pipeline.schedules import SCHEDULES

STEP_TIMEOUT_S = 600.0
"""Bound on one global batch (and on any other wait on the stages): a hung stage surfaces."""


@dataclasses.dataclass(frozen=True)
class Place:
    """Where an actor sits: stage position `stage` of pipeline replica `replica`, holding chunks
    c = 0..chunks-1, i.e. virtual stages c*stages + stage. Its rank in the group of all R*K
    actors is replica*stages + stage."""

    stage: int
    stages: int
    replica: int = 0
    replicas: int = 1
    chunks: int = 1

    @property
    def rank(self) -> int:
        return self.replica * self.stages + self.stage

    @property
    def last(self) -> int:
        """The last virtual stage: the one that computes the loss."""
        return self.stages * self.chunks - 1

    def virtual(self, chunk: int) -> int:
        return chunk * self.stages + self.stage

    def rank_of(self, virtual: int) -> int:
        """The rank, in this replica, of the actor that holds virtual stage `virtual`."""
        return self.replica * self.stages + virtual % self.stages

    def tag(self, mb: int, cut: int, backward: bool) -> int:
        """The gloo tag of what crosses the cut after virtual stage `cut` for micro-batch `mb`:
        messages between two actors are matched by tag, whatever order the schedule sends them."""
        return 2 * (mb * (self.last + 1) + cut) + backward


# --- communication: a gloo process group among the stages, point to point -----------------------

def on_cpu(state: Any) -> Any:
    """A state dict with every tensor on the CPU: the driver need not have a GPU."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: on_cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [on_cpu(v) for v in state]
    return state


def merged(chunks: list[nn.Sequential]) -> nn.Sequential:
    """The chunks' blocks as one Sequential under their keys in the whole model: its state_dict
    and parameters are the stage's, whatever the number of chunks."""
    return nn.Sequential(OrderedDict((k, m) for chunk in chunks for k, m in chunk._modules.items()))


# --- one stage: its blocks, their optimizer, the activations waiting for their backward ---------

class Stage:
    """Ray actor holding one chunk of contiguous blocks of the model (or several, interleaved)
    and the optimizer of their parameters. The first stage also holds the training inputs, the
    last one the targets, so that per step only the micro-batches' sample indices travel from
    the driver."""

    def __init__(self, spec: RunSpec, place: Place, chunks: list[nn.Sequential], names: list[str],
                 task: str, x: torch.Tensor | None, y: torch.Tensor | None, incoming: list[Shape],
                 faults: Faults, steps: int) -> None:
        torch.set_num_threads(spec.threads_per_worker)
        self.faults = faults
        # Ray sets CUDA_VISIBLE_DEVICES to the GPU it gave this actor, if any.
        self.device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        self.spec, self.place, self.task = spec, place, task
        self.schedule = SCHEDULES[spec.schedule]
        self.chunks, self.incoming = [c.to(self.device) for c in chunks], incoming
        self.layers = merged(self.chunks)
        self.x, self.y = (None if t is None else t.to(self.device) for t in (x, y))
        # names: its parameters' names in the whole model (muon splits by them)
        self.optimizer = make_optimizer(spec, zip(names, self.layers.parameters(), strict=True))
        self.entry = OPTIMIZERS[spec.optimizer]
        self.scheduler = make_scheduler(spec, self.optimizer, steps)  # the run's `steps` global batches
        self.replica_group: Any = None
        """the replicas of this stage position, when there are several"""
        self.saved: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        """(micro-batch, chunk) -> (input, output; the scaled loss on the last stage) until its
        backward"""
        self.deferred: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
        """split backward: (micro-batch, chunk) -> (output, its gradient) until the weight pass"""
        self.sending: list[tuple[dist.Work, torch.Tensor]] = []
        """sends under way, with their buffers, until the step's end"""
        self.events: list[tuple[str, int, int, float, float]] | None = None
        """(kind, micro-batch, chunk, start, end) of the step being recorded (the timeline)"""
        self.recorded: list[tuple[str, int, int, float, float]] = []
        self.store: Any = None
        """rank 0: the process group's TCPStore, hosted from `address` on"""
        self.held: dict[str, int] | None = None
        """model state after an epoch's first optimizer step, gradients still held"""
        self.reset()

    def whoami(self) -> tuple[str, int]:
        """Its actor id and pid: the driver names a dead stage by them."""
        return whoami()

    def address(self) -> tuple[str, int]:
        """Host the group's store (rank 0): this node's address and the port the store bound.
        The OS picks the port as the store binds it: a port found free first and bound later
        may be taken meanwhile by another process on a shared machine (EADDRINUSE, seen)."""
        ip = ray.util.get_node_ip_address()
        self.store = dist.TCPStore(ip, 0, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=STEP_TIMEOUT_S))
        return ip, self.store.port

    def join(self, ip: str, port: int) -> None:
        """Enter the process group of all stage actors (blocks until every one has) and, with
        replicas, every stage position's group (each actor creates every group, in order)."""
        p, timeout = self.place, timedelta(seconds=STEP_TIMEOUT_S)
        store = self.store if p.rank == 0 else dist.TCPStore(ip, port, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=p.rank, world_size=p.stages * p.replicas,
                                timeout=timeout)
        if p.replicas > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            for k in range(p.stages):
                group = dist.new_group([r * p.stages + k for r in range(p.replicas)], backend=backend)
                if k == p.stage:
                    self.replica_group = group

    def reset(self) -> None:
        self.loss, self.peak, self.sent = 0.0, 0, 0
        self.clock = {"compute_s": 0.0, "comm_s": 0.0}

    @contextmanager
    def timed(self, kind: str, op: tuple[str, int, int] | None = None) -> Iterator[None]:
        """Adds the block's seconds to `kind`; the op's start and end go to the timeline when
        this step is recorded."""
        t, wall = time.perf_counter(), time.time()
        yield
        self.clock[kind] += time.perf_counter() - t
        if op is not None and self.events is not None:
            self.events.append((*op, wall, time.time()))

    def receive(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, tag: int,
                op: tuple[str, int, int]) -> torch.Tensor:
        """Blocks until the neighbour's tensor is here (its compute included: the bubble)."""
        buffer = torch.empty(shape, dtype=dtype)
        with self.timed("comm_s", op):
            dist.recv(buffer, src, tag=tag)
        return buffer.to(self.device)

    def transmit(self, t: torch.Tensor, dst: int, tag: int, op: tuple[str, int, int]) -> None:
        # isend: a blocking send waits for the matching receive, and under 1F1B neighbours send
        # to each other at the same time (ray.util.collective's gloo send is such a blocking one)
        buffer = t.detach().to("cpu").contiguous()
        self.sent += buffer.nbytes
        with self.timed("comm_s", op):
            self.sending.append((dist.isend(buffer, dst, tag=tag), buffer))

    def forward(self, mb: int, chunk: int, idx: torch.Tensor, batch_size: int) -> None:
        p, s = self.place, self.place.virtual(chunk)
        if s == 0:
            x = self.x[idx]
        else:
            shape, dtype = self.incoming[chunk]
            x = self.receive((len(idx), *shape), dtype, p.rank_of(s - 1), p.tag(mb, s - 1, False),
                             ("recv", mb, chunk)).requires_grad_()
        with self.timed("compute_s", ("F", mb, chunk)):
            out = self.chunks[chunk](x)
            if s == p.last:
                total = loss_fn(self.task)(out, self.y[idx])
                self.loss += total.item()
                out = total / denominator(batch_size)  # the micro-batches' gradients add up
        self.saved[(mb, chunk)] = (x, out)
        self.peak = max(self.peak, len(self.saved) + len(self.deferred))
        if s != p.last:
            self.transmit(out, p.rank_of(s + 1), p.tag(mb, s, False), ("send", mb, chunk))

    def backward(self, mb: int, chunk: int) -> None:
        """The output's gradient back through the chunk; under a split backward only to its
        input (the weight pass, W, comes later), else into the weights' .grad too."""
        p, s = self.place, self.place.virtual(chunk)
        split = self.schedule.split_backward
        x, out = self.saved.pop((mb, chunk))
        grad = None if s == p.last else self.receive(out.shape, out.dtype, p.rank_of(s + 1),
                                                     p.tag(mb, s, True), ("recv", mb, chunk))
        with self.timed("compute_s", ("B", mb, chunk)):
            if not split:
                out.backward(grad)  # accumulates into .grad: the sum over micro-batches
            elif s != 0:  # the first stage's input is data: its gradient is nobody's
                (x.grad,) = torch.autograd.grad(out, x, grad, retain_graph=True)
        if split:
            self.deferred[(mb, chunk)] = (out, grad)
            self.peak = max(self.peak, len(self.saved) + len(self.deferred))
        if s != 0:
            self.transmit(x.grad, p.rank_of(s - 1), p.tag(mb, s - 1, True), ("send", mb, chunk))

    def weights(self, mb: int, chunk: int) -> None:
        """A split backward's weight pass: the output's gradient into the weights' .grad."""
        out, grad = self.deferred.pop((mb, chunk))
        params = [q for q in self.chunks[chunk].parameters() if q.requires_grad]
        with self.timed("compute_s", ("W", mb, chunk)):
            if params:  # a chunk without weights (a reshape) has no weight pass
                out.backward(grad, inputs=params)

    def train_step(self, epoch: int, micro: list[np.ndarray], batch_size: int,
                   record: bool = False) -> None:
        """One global batch (each micro-batch's sample indices): this stage's ops in schedule
        order, then the flush (all micro-batches' gradients are in: step the optimizer and its lr
        schedule once per global batch).
        `record`: keep the ops' start and end times for the timeline."""
        self.faults.maybe_fail(self.place.rank, epoch)
        self.events = [] if record else None
        p = self.place
        run = {"F": lambda i, c: self.forward(i, c, torch.tensor(micro[i]), batch_size),
               "B": self.backward, "W": self.weights}
        for kind, i, chunk in self.schedule.ops(p.stage, p.stages, len(micro), p.chunks):
            run[kind](i, chunk)
        with self.timed("comm_s", ("sends", -1, -1)):
            for work, _ in self.sending:
                work.wait()
        self.sending.clear()
        self.sum_replicas()
        with self.timed("compute_s", ("step", -1, -1)):
            self.optimizer.step()
            self.scheduler.step()
        if self.held is None:  # weights, gradients and optimizer state at once: once an epoch
            self.held = memory.state_bytes(self.layers, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        if record:
            self.recorded, self.events = self.events or [], None

    def sum_replicas(self) -> None:
        """The replicas of this stage position sum their gradients (each of them the gradient
        of its share of the global batch's mean loss): one all-reduce of all of them, flat. A
        replica without samples in this batch adds zeros."""
        if self.replica_group is None:
            return
        params = list(self.layers.parameters())
        with self.timed("comm_s", ("allreduce", -1, -1)):
            flat = torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).reshape(-1)
                              for q in params])
            dist.all_reduce(flat, group=self.replica_group)
            # as ddp counts it: each of R ranks of gloo's ring sends 2(R-1)/R of the payload
            self.sent += 2 * (self.place.replicas - 1) * flat.nbytes / self.place.replicas
        for q, g in zip(params, torch.split(flat, [q.numel() for q in params]), strict=True):
            q.grad = g.view_as(q)

    def train_mode(self) -> None:
        """Before an epoch's steps: the weights gradients are taken at (schedule-free: y)."""
        self.entry.train(self.optimizer)

    def end_epoch(self) -> dict[str, Any]:
        """After them (one round trip, as it lies in the timed epoch): switch to the weights to
        evaluate and checkpoint (schedule-free: x), and return the sum of losses (last stage),
        compute and communication seconds, the most activations held at once, the bytes sent
        and its memory fields (raydist/memory/) since the last call; the recorded step's ops,
        if any, and this actor's node."""
        self.entry.eval(self.optimizer)
        stats = {"loss": self.loss, "peak": self.peak, "sent": self.sent, **self.clock,
                 "events": self.recorded, "node": ray.get_runtime_context().get_node_id(),
                 "memory": {**memory.measure(self.layers, self.optimizer), **(self.held or {})}}
        self.recorded, self.held = [], None
        self.reset()
        return stats

    def state(self) -> dict[str, Any]:
        return on_cpu({"model": self.layers.state_dict(), "optimizer": self.optimizer.state_dict(),
                       "scheduler": self.scheduler.state_dict()})

    def load(self, state: dict[str, Any]) -> None:
        self.layers.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        restore_scheduler(self.scheduler, state.get("scheduler"))
