"""`pipeline`: the model cut into K contiguous stages, one Ray actor each; GPipe and 1F1B.

Every global batch is split into M micro-batches. The driver makes one call per stage per
global batch; the stages then run their schedule among themselves, activations flowing forward
and their gradients back over a gloo process group of the stage actors (point to point, never
through the driver or the object store). The last stage's loss is the SUM over its micro-batch
divided by the GLOBAL batch size, so the gradients accumulated over the micro-batches are the
full-batch gradient; every stage steps its own optimizer once all micro-batches are back (the
flush), and the run equals `local` to round-off.

Where the model is cut and the schedules (which op a stage runs when) are in
`raydist/pipelining.py`. Read here: the check of a spec, communication, the Stage actor (the
math), the driver (one epoch, restarts from the per-epoch checkpoint after a stage dies).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.exceptions import ObjectLostError, RayActorError
from torch import nn

from raydist import checkpoint, faults
from raydist.cluster import connect, free_port, require
from raydist.config import ConfigError, RunSpec
from raydist.data import Dataset, load_data
from raydist.engine import (
    LOSSES,
    Diverged,
    Record,
    Report,
    RunResult,
    evaluate,
    global_batches,
    make_optimizer,
    make_record,
)
from raydist.models import build_model
from raydist.pipelining import SCHEDULES, Shape, boundary_shapes, stage_bounds

START_TIMEOUT_S = 300.0
"""Stage actors that have not started by then mean the cluster's CPUs are taken by other work."""
RESUMABLE = ("epochs", "out", "address", "max_failures", "threads_per_worker", "use_gpu")
"""Settings a run resumed from its checkpoint may change: where and how fast it runs."""
STEP_TIMEOUT_S = 600.0
"""Bound on one global batch (and on any other wait on the stages): a hung stage surfaces."""
PEER_DEATH_S = 30.0
"""How long a stage's failure waits for Ray to report a dead neighbour as its cause."""
LOST = (RayActorError, ObjectLostError)
"""What a dead stage looks like to the driver: its own calls fail, and so do the calls that
read an object it owned (a RayTaskError of that cause is also an instance of it)."""


class StageFailed(RuntimeError):
    """Stages died more often than `max_failures` allows, or a stage stopped answering."""


def check(spec: RunSpec, data: Dataset) -> None:
    """The cut and the micro-batches must fit the model and the batch."""
    blocks = len(build_model(spec, data))
    k = spec.stages
    if k > blocks:
        raise ConfigError(f"stages: got {k}, but model '{spec.model}' has only {blocks} blocks; "
                          f"expected at most {blocks}")
    batch = len(global_batches(spec, data, 1)[0])  # gd: the whole training set
    if spec.microbatches > batch:
        raise ConfigError(f"microbatches: got {spec.microbatches}, more than the global batch of "
                          f"{batch} samples; expected at most {batch}")
    cuts = spec.cuts
    if cuts is None:
        return
    if len(cuts) != k - 1:
        raise ConfigError(f"cuts: got {cuts}; expected {k - 1} block indices (stages - 1) "
                          f"for stages={k}")
    if any(b <= a for a, b in itertools.pairwise(cuts)):
        raise ConfigError(f"cuts: got {cuts}; expected strictly increasing block indices")
    if not all(1 <= c < blocks for c in cuts):
        raise ConfigError(f"cuts: got {cuts}; expected block indices from 1 to {blocks - 1} "
                          f"(model '{spec.model}' has {blocks} blocks)")


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

    def __init__(self, spec: RunSpec, index: int, stages: int, layers: nn.Sequential, task: str,
                 x: torch.Tensor | None, y: torch.Tensor | None, incoming: Shape) -> None:
        torch.set_num_threads(spec.threads_per_worker)
        # Ray sets CUDA_VISIBLE_DEVICES to the GPU it gave this actor, if any.
        self.device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        self.spec, self.index, self.stages, self.task = spec, index, stages, task
        self.layers, self.incoming = layers.to(self.device), incoming
        self.x, self.y = (None if t is None else t.to(self.device) for t in (x, y))
        self.first, self.last = index == 0, index == stages - 1
        self.optimizer = make_optimizer(spec, layers.parameters())
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
        self.loss, self.peak = 0.0, 0
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
                total = LOSSES[self.task](out, self.y[idx])
                self.loss += total.item()
                out = total / batch_size
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
        faults.maybe_fail(self.spec.out, self.index, epoch)
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

    def epoch_stats(self) -> dict[str, float]:
        """Sum of losses (last stage), compute and communication seconds and the most activations
        held at once, since the last call."""
        stats = {"loss": self.loss, "peak": self.peak, **self.clock}
        self.reset()
        return stats

    def state(self) -> dict[str, Any]:
        return on_cpu({"model": self.layers.state_dict(), "optimizer": self.optimizer.state_dict()})

    def load(self, state: dict[str, Any]) -> None:
        self.layers.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


# --- the driver ---------------------------------------------------------------------------------

def finished(refs: list[ray.ObjectRef], timeout: float) -> Iterator[ray.ObjectRef]:
    """`refs` in the order they finish, until `timeout` seconds have passed."""
    deadline, pending = time.monotonic() + timeout, list(refs)
    while pending:
        done, pending = ray.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            return
        yield done[0]


def wait(refs: list[ray.ObjectRef], what: str, timeout: float = STEP_TIMEOUT_S) -> list[Any]:
    """All results, or the first failure as soon as it happens. A stage whose neighbour died
    fails too (its connection closed); Ray reports the dead stage a moment later, and that is
    the error raised, so that the run restarts rather than ends."""
    pending = set(refs)
    for ref in finished(refs, timeout):
        pending.discard(ref)
        try:
            ray.get(ref)
        except LOST:
            raise
        except ray.exceptions.RayTaskError as e:
            raise death_among(list(pending)) or e from None
    if pending:
        raise StageFailed(f"pipeline: {what} did not finish within {timeout:g} s")
    return ray.get(refs)


def death_among(refs: list[ray.ObjectRef]) -> Exception | None:
    for ref in finished(refs, PEER_DEATH_S):
        try:
            ray.get(ref)
        except LOST as e:
            return e
        except ray.exceptions.RayTaskError:
            pass
    return None


def spawn(spec: RunSpec, data: Dataset, bounds: list[int]) -> list[ray.actor.ActorHandle]:
    """One actor per stage, each given its slice of a freshly built model (the weights local
    starts from) and, first and last, the training inputs and targets: the data set is read
    once, by the driver. Actors do not inherit the driver's environment: the test fault knob
    is handed over explicitly."""
    options: dict[str, Any] = {"num_cpus": spec.threads_per_worker, "max_restarts": 0,
                               "num_gpus": gpus_per_stage(spec)}
    if "RAYDIST_FAULT" in os.environ:
        options["runtime_env"] = {"env_vars": {"RAYDIST_FAULT": os.environ["RAYDIST_FAULT"]}}
    actor = ray.remote(Stage).options(**options)
    model = build_model(spec, data)
    shapes = boundary_shapes(model, data.x_train[:1], bounds)
    k = len(bounds) - 1
    return [actor.remote(spec, i, k, model[bounds[i] : bounds[i + 1]], data.task,
                         data.x_train if i == 0 else None, data.y_train if i == k - 1 else None,
                         shapes[i])
            for i in range(k)]


def gpus_per_stage(spec: RunSpec) -> float:
    """With GPUs (use_gpu, or by default when the cluster has any): a whole GPU per stage when
    there are enough, else the stages share them (2 stages on 1 GPU: half each). Asked for on a
    cluster without any, a whole one each, which the capacity check then refuses."""
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if not (spec.use_gpu if spec.use_gpu is not None else gpus > 0):
        return 0.0
    return min(1.0, gpus / spec.stages) if gpus else 1.0


def start(stages: list[ray.actor.ActorHandle], saved: dict[str, Any] | None) -> None:
    """Load the checkpoint, if any, into the new stages and connect them."""
    what = f"the start of {len(stages)} stage actors (other work may hold the cluster's CPUs)"
    loads = [s.load.remote(st) for s, st in zip(stages, saved["stages"], strict=True)] if saved else []
    ip, port = wait([stages[0].address.remote(), *loads], what, START_TIMEOUT_S)[0]
    wait([s.join.remote(ip, port) for s in stages], what, START_TIMEOUT_S)


def train_epoch(spec: RunSpec, data: Dataset, stages: list[ray.actor.ActorHandle],
                epoch: int) -> None:
    """One call per stage per global batch: the stages run the schedule among themselves. Batch
    b+1 is handed out before the driver waits for batch b, so no stage idles while the driver
    learns that b is done. A short last batch of an epoch may have fewer samples than
    micro-batches: the empty ones are skipped."""
    in_flight: list[ray.ObjectRef] = []
    for batch in global_batches(spec, data, epoch):
        # numpy, not tensors: Ray pickles a torch tensor ~0.6 ms slower, per tensor and per stage
        micro = [m.numpy() for m in torch.tensor_split(batch, spec.microbatches) if len(m)]
        refs = [s.train_step.remote(epoch, micro, len(batch)) for s in stages]
        wait(in_flight, f"a global batch of epoch {epoch}")
        in_flight = refs
    wait(in_flight, f"a global batch of epoch {epoch}")


def pipeline_record(spec: RunSpec, stats: list[dict[str, float]], elapsed: float) -> Record:
    """Bubble: the share of the stages' time in the epoch's steps not spent computing (waiting
    for a neighbour or moving tensors), next to GPipe's bound for equal stages and free
    communication."""
    k, m = len(stats), spec.microbatches
    compute = sum(s["compute_s"] for s in stats)
    rec: Record = {"bubble_fraction": max(0.0, 1 - compute / (k * elapsed)),
                   "bubble_bound": (k - 1) / (m + k - 1)}
    for i, s in enumerate(stats):
        rec[f"stage{i}_compute_s"] = s["compute_s"]
        rec[f"stage{i}_comm_s"] = s["comm_s"]
        rec[f"stage{i}_peak_activations"] = s["peak"]
    return rec


def fit(spec: RunSpec, data: Dataset, model: nn.Sequential, stages: list[ray.actor.ActorHandle],
        history: list[Record], report: Report) -> None:
    """Train from epoch len(history)+1, appending to `history`. After every epoch the driver's
    `model` is reassembled from the stages, evaluated, and checkpointed before it is reported."""
    start = time.perf_counter() - (history[-1]["wall_time_s"] if history else 0.0)
    for epoch in range(len(history) + 1, spec.epochs + 1):
        t = time.perf_counter()
        train_epoch(spec, data, stages, epoch)
        elapsed = time.perf_counter() - t
        stats = wait([s.epoch_stats.remote() for s in stages], "collecting stage statistics")
        states = wait([s.state.remote() for s in stages], "collecting stage weights")
        model.load_state_dict({k: v for st in states for k, v in st["model"].items()})
        rec = make_record(epoch, stats[-1]["loss"] / data.n_train, evaluate(model, data),
                          data.n_train, elapsed, time.perf_counter() - start)
        rec.update(pipeline_record(spec, stats, elapsed))
        checkpoint.write(spec.out, {"spec": spec.to_dict(), "history": [*history, rec], "stages": states})
        history.append(rec)
        report(rec)
        if not math.isfinite(rec["train_loss"]):
            raise Diverged(f"training loss is {rec['train_loss']} at epoch {epoch}")


def run(spec: RunSpec, report: Report) -> RunResult:
    connect(spec)
    require(spec.stages * spec.threads_per_worker, spec.stages * gpus_per_stage(spec),
            f"pipeline ({spec.stages} stages x {spec.threads_per_worker} threads)")
    data = load_data(spec)
    model = build_model(spec, data)  # the driver's copy, reassembled from the stages each epoch
    bounds = stage_bounds(spec, model)
    history: list[Record] = []
    restarts = checkpoint.Restarts("pipeline", spec.max_failures, StageFailed)
    while True:
        # from this run's latest checkpoint (an earlier invocation's too); none: from the start
        saved = checkpoint.resume("pipeline", spec, RESUMABLE)
        history[:] = saved["history"] if saved else []
        if saved:
            model.load_state_dict({k: v for st in saved["stages"] for k, v in st["model"].items()})
        if len(history) == spec.epochs:
            return RunResult(history, model.state_dict())
        stages = spawn(spec, data, bounds)
        started = False
        try:
            start(stages, saved)
            started = True
            fit(spec, data, model, stages, history, report)
            return RunResult(history, model.state_dict())
        except LOST as e:
            (restarts.while_training if started else restarts.before_start)(e)
        finally:
            for stage in stages:
                ray.kill(stage)
