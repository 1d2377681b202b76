"""`pipeline`: the model cut into K contiguous stages, one Ray actor each; GPipe and 1F1B.

Every global batch is split into M micro-batches. Activations flow forward stage to stage and
their gradients flow back, as numpy arrays in the object store: a stage `ray.put`s what it
sends and the driver hands that reference to the next stage, never fetching a tensor itself.
The last stage's loss is the SUM over its micro-batch divided by the GLOBAL batch size, so
the gradients accumulated over the micro-batches are the full-batch gradient; every stage
steps its own optimizer once all micro-batches are back (the flush), and the run equals
`local` to round-off.

Read in this order: where the model is cut, the schedules (which op a stage runs when),
communication (send / recv), the Stage actor (the math), the driver (one step, one epoch,
restarts from the per-epoch checkpoint after a stage dies).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError
from torch import nn

from raydist import checkpoint, faults
from raydist.cluster import connect, require
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

START_TIMEOUT_S = 300.0
"""Stage actors that have not started by then mean the cluster's CPUs are taken by other work."""
START_RETRIES = 3
"""Restarts whose new stages die before they ever run (placed on a node that has just died but
that Ray has not yet declared dead: seconds) are retried this often, apart from max_failures."""
STEP_TIMEOUT_S = 600.0
"""Bound on one global batch (and on any other wait on the stages): a hung stage surfaces."""
LOST = (RayActorError, ObjectLostError)
"""What a dead stage looks like to the driver: its own calls fail, and so do the calls that
read an object it owned (a RayTaskError of that cause is also an instance of it)."""


class StageFailed(RuntimeError):
    """Stages died more often than `max_failures` allows, or a stage stopped answering."""


# --- where the model is cut ---------------------------------------------------------------------

def block_sizes(model: nn.Sequential) -> list[int]:
    return [sum(p.numel() for p in block.parameters()) for block in model]


def balanced_cuts(sizes: list[int], stages: int) -> list[int]:
    """Block indices where stages 2..K start: the largest stage as small as possible, then the
    stages as even as possible (least sum of squared sizes; ties: the earliest cuts)."""
    prefix = [0, *itertools.accumulate(sizes)]
    n = len(sizes)

    def size(start: int, end: int) -> int:
        return prefix[end] - prefix[start]

    def cuts_after(start: int, parts: int) -> range:
        return range(start + 1, n - parts + 2)

    @functools.cache
    def largest(start: int, parts: int) -> int:
        """The smallest possible largest stage of blocks start..n-1 in `parts` stages."""
        if parts == 1:
            return size(start, n)
        return min(max(size(start, c), largest(c, parts - 1)) for c in cuts_after(start, parts))

    limit = largest(0, stages)

    @functools.cache
    def even(start: int, parts: int) -> tuple[float, tuple[int, ...]]:
        """(sum of squared sizes, cuts) of blocks start..n-1 in `parts` stages within the limit."""
        if parts == 1:
            return (size(start, n) ** 2 if size(start, n) <= limit else math.inf), ()
        options = []
        for c in cuts_after(start, parts):
            if size(start, c) <= limit:
                rest, cuts = even(c, parts - 1)
                options.append((size(start, c) ** 2 + rest, (c, *cuts)))
        return min(options, default=(math.inf, ()))

    return list(even(0, stages)[1])


def stage_bounds(spec: RunSpec, model: nn.Sequential) -> list[int]:
    """[0, cut_1, ..., cut_{K-1}, blocks]: stage k holds blocks bounds[k]:bounds[k+1]."""
    cuts = spec.cuts if spec.cuts is not None else balanced_cuts(block_sizes(model), spec.stages)
    return [0, *cuts, len(model)]


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


# --- schedules: the order of forward (F) and backward (B) micro-batch ops on one stage ----------

Op = tuple[str, int]


def gpipe(stage: int, stages: int, m: int) -> list[Op]:
    """All forwards, then all backwards: every stage holds all M micro-batches' activations."""
    return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]


def one_f_one_b(stage: int, stages: int, m: int) -> list[Op]:
    """Warm up with as many forwards as stages downstream, then alternate one forward, one
    backward: a stage never holds more than `stages` micro-batches' activations."""
    warmup = min(stages - stage - 1, m)
    ops = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        ops += [("F", warmup + i), ("B", i)]
    return ops + [("B", i) for i in range(m - warmup, m)]


SCHEDULES: dict[str, Callable[[int, int, int], list[Op]]] = {"gpipe": gpipe, "1f1b": one_f_one_b}


# --- communication: tensors travel as numpy arrays in the object store --------------------------

Box = list
"""[ObjectRef]: a wrapped reference, so that Ray passes it to the next stage as it is and the
receiving stage fetches (and times) the array itself."""


def send(t: torch.Tensor) -> Box:
    return [ray.put(t.detach().cpu().numpy())]


def recv(box: Box, device: torch.device) -> torch.Tensor:
    # a copy: the store's array is read-only
    return torch.tensor(ray.get(box[0], timeout=STEP_TIMEOUT_S), device=device)


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
    that per micro-batch only sample indices travel from the driver."""

    def __init__(self, spec: RunSpec, index: int, layers: nn.Sequential, task: str,
                 x: torch.Tensor | None, y: torch.Tensor | None) -> None:
        torch.set_num_threads(spec.threads_per_worker)
        # Ray sets CUDA_VISIBLE_DEVICES to the GPU it gave this actor, if any.
        self.device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        self.spec, self.index, self.layers, self.task = spec, index, layers.to(self.device), task
        self.x, self.y = (None if t is None else t.to(self.device) for t in (x, y))
        self.first, self.last = x is not None, y is not None
        self.optimizer = make_optimizer(spec, layers.parameters())
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        """micro-batch -> (input, output; the scaled loss on the last stage) until its backward"""
        self.reset()

    def reset(self) -> None:
        self.loss, self.peak = 0.0, 0
        self.clock = {"compute_s": 0.0, "comm_s": 0.0}

    @contextmanager
    def timed(self, kind: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.clock[kind] += time.perf_counter() - t

    def receive(self, box: Box) -> torch.Tensor:
        with self.timed("comm_s"):
            return recv(box, self.device)

    def transmit(self, t: torch.Tensor) -> Box:
        with self.timed("comm_s"):
            return send(t)

    def forward(self, epoch: int, mb: int, idx: torch.Tensor, box: Box | None,
                batch_size: int) -> Box | None:
        faults.maybe_fail(self.spec.out, self.index, epoch)
        x = self.x[idx] if self.first else self.receive(box).requires_grad_()
        with self.timed("compute_s"):
            out = self.layers(x)
            if self.last:
                total = LOSSES[self.task](out, self.y[idx])
                self.loss += total.item()
                out = total / batch_size
        self.saved[mb] = (x, out)
        self.peak = max(self.peak, len(self.saved))
        return None if self.last else self.transmit(out)

    def backward(self, mb: int, box: Box | None) -> Box | None:
        x, out = self.saved.pop(mb)
        grad = None if self.last else self.receive(box)
        with self.timed("compute_s"):
            out.backward(grad)  # accumulates into .grad: the sum over micro-batches
        return None if self.first else self.transmit(x.grad)

    def step(self) -> None:
        """The flush: all micro-batches' gradients are in, step once per global batch."""
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

    def ready(self) -> None:
        pass


# --- the driver ---------------------------------------------------------------------------------

def wait(refs: list[ray.ObjectRef], what: str, timeout: float = STEP_TIMEOUT_S) -> list[Any]:
    try:
        return ray.get(refs, timeout=timeout)
    except GetTimeoutError:
        raise StageFailed(f"pipeline: {what} did not finish within {timeout:g} s") from None


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
    last = len(bounds) - 2
    return [actor.remote(spec, k, model[bounds[k] : bounds[k + 1]], data.task,
                         data.x_train if k == 0 else None, data.y_train if k == last else None)
            for k in range(last + 1)]


def gpus_per_stage(spec: RunSpec) -> float:
    """With GPUs (use_gpu, or by default when the cluster has any): a whole GPU per stage when
    there are enough, else the stages share them (2 stages on 1 GPU: half each). Asked for on a
    cluster without any, a whole one each, which the capacity check then refuses."""
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if not (spec.use_gpu if spec.use_gpu is not None else gpus > 0):
        return 0.0
    return min(1.0, gpus / spec.stages) if gpus else 1.0


def restore(stages: list[ray.actor.ActorHandle], saved: dict[str, Any] | None) -> None:
    calls = ([s.load.remote(st) for s, st in zip(stages, saved["stages"], strict=True)] if saved
             else [s.ready.remote() for s in stages])
    wait(calls, f"the start of {len(stages)} stage actors (other work may hold the cluster's "
         "CPUs)", START_TIMEOUT_S)


def submit(stages: list[ray.actor.ActorHandle], orders: list[list[Op]], epoch: int,
           micro: list[torch.Tensor], batch_size: int) -> list[ray.ObjectRef]:
    """Hand every stage its ops in schedule order, each as soon as the reference it reads
    exists; Ray runs an actor's calls in the order they were made. Returns the sinks (the last
    stage's forwards, the first stage's backwards): every other op feeds one of them, so any
    failure shows there."""
    last = len(stages) - 1
    done: dict[tuple[str, int, int], ray.ObjectRef] = {}
    todo = [deque(order) for order in orders]
    while any(todo):
        progressed = False
        for k, ops in enumerate(todo):
            while ops:
                op, i = ops[0]
                src = ("F", k - 1, i) if op == "F" else ("B", k + 1, i)
                if 0 <= src[1] <= last and src not in done:
                    break
                box = done.get(src)
                done[op, k, i] = (stages[k].forward.remote(epoch, i, micro[i], box, batch_size)
                                  if op == "F" else stages[k].backward.remote(i, box))
                ops.popleft()
                progressed = True
        if not progressed:
            raise RuntimeError(f"schedule deadlocks: {orders}")
    m = len(micro)
    return [done["F", last, i] for i in range(m)] + [done["B", 0, i] for i in range(m)]


def submit_step(spec: RunSpec, stages: list[ray.actor.ActorHandle], epoch: int,
                batch: torch.Tensor) -> list[ray.ObjectRef]:
    """One global batch through the pipeline, then the flush; returns what to wait for. A short
    last batch of an epoch may have fewer samples than micro-batches: the empty ones are skipped."""
    micro = [m for m in torch.tensor_split(batch, spec.microbatches) if len(m)]
    orders = [SCHEDULES[spec.schedule](k, len(stages), len(micro)) for k in range(len(stages))]
    return submit(stages, orders, epoch, micro, len(batch)) + [s.step.remote() for s in stages]


def train_epoch(spec: RunSpec, data: Dataset, stages: list[ray.actor.ActorHandle],
                epoch: int) -> None:
    """Batch b+1 is handed out before the driver waits for batch b: a stage runs its calls in
    order, so its step on b still comes before its forwards on b+1, and no stage idles while
    the driver learns that b is done."""
    in_flight: list[ray.ObjectRef] = []
    for batch in global_batches(spec, data, epoch):
        refs = submit_step(spec, stages, epoch, batch)
        wait(in_flight, f"a global batch of epoch {epoch}")
        in_flight = refs
    wait(in_flight, f"a global batch of epoch {epoch}")


def pipeline_record(spec: RunSpec, stats: list[dict[str, float]], elapsed: float) -> Record:
    """Bubble: the share of the stages' time in the epoch's steps spent neither computing nor
    communicating, next to GPipe's bound for equal stages and free communication."""
    k, m = len(stats), spec.microbatches
    busy = sum(s["compute_s"] + s["comm_s"] for s in stats)
    rec: Record = {"bubble_fraction": max(0.0, 1 - busy / (k * elapsed)),
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
        checkpoint.write(spec.out, {"epoch": epoch, "history": [*history, rec], "stages": states})
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
    failures = unstarted = 0
    while True:
        # resume from this run's latest checkpoint; none yet means from the start
        saved = checkpoint.read(spec.out) if history else None
        if saved:
            history[:] = saved["history"]
        stages = spawn(spec, data, bounds)
        started = False
        try:
            restore(stages, saved)
            started = True
            fit(spec, data, model, stages, history, report)
            break
        except LOST as e:
            if not started:
                unstarted += 1
                if unstarted > START_RETRIES:
                    raise StageFailed(f"pipeline: stage actors died before they started, "
                                      f"{unstarted} times ({type(e).__name__})") from e
                continue
            failures += 1
            if failures > spec.max_failures:
                raise StageFailed(f"pipeline: a stage actor died ({type(e).__name__}) and "
                                  f"max_failures={spec.max_failures} restarts are used up") from e
        finally:
            for stage in stages:
                ray.kill(stage)
    Path(spec.out, checkpoint.NAME).unlink(missing_ok=True)  # the outputs are local's
    return RunResult(history, model.state_dict())
