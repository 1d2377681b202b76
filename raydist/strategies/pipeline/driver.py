"""The pipeline driver's side: the stage actors of one attempt (`Pipeline`, the engine's Trainer
for pipeline), how they start, and how the driver hands out global batches and learns of a
dead stage."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import ray
import torch
from ray.exceptions import ObjectLostError, RayActorError
from torch import nn

from raydist import checkpoint
from raydist.config import RunSpec
from raydist.data import Dataset
from raydist.engine import Record, evaluate
from raydist.faults import Faults
from raydist.models import build_model
from raydist.strategies.pipeline import StageFailed, gpus_per_stage
from raydist.strategies.pipeline.cuts import Blocks, blocks_of, boundary_shapes
from raydist.strategies.pipeline.stage import STEP_TIMEOUT_S, Stage

START_TIMEOUT_S = 300.0
"""Stage actors that have not started by then mean the cluster's CPUs are taken by other work."""
PEER_DEATH_S = 30.0
"""How long a stage's failure waits for Ray to report a dead neighbour as its cause."""
LOST = (RayActorError, ObjectLostError)
"""What a dead stage looks like to the driver: its own calls fail, and so do the calls that
read an object it owned (a RayTaskError of that cause is also an instance of it)."""


def lost(e: BaseException) -> bool:
    return isinstance(e, LOST)


class Pipeline:
    """The stages of one attempt, and the driver's copy of the model, reassembled from them
    after every epoch (under the model's own keys) to evaluate it."""

    def __init__(self, spec: RunSpec, data: Dataset, model: nn.Module, blocks: Blocks,
                 bounds: list[int], saved: dict[str, Any] | None) -> None:
        self.spec, self.data, self.model, self.blocks = spec, data, model, blocks
        self.stages = spawn(spec, data, bounds)
        self.states: list[dict[str, Any]] = []
        try:
            start(self.stages, saved)
        except BaseException:
            self.close()
            raise

    def train_epoch(self, epoch: int, batches: list[torch.Tensor]) -> tuple[float, Record]:
        wait([s.train_mode.remote() for s in self.stages], "the stages' switch to training")
        t = time.perf_counter()
        run_batches(self.spec, self.stages, epoch, batches)
        elapsed = time.perf_counter() - t  # the steps alone: what the bubble is a share of
        wait([s.eval_mode.remote() for s in self.stages], "the stages' switch to evaluation")
        stats = wait([s.epoch_stats.remote() for s in self.stages], "collecting stage statistics")
        return stats[-1]["loss"], pipeline_record(self.spec, stats, elapsed, len(batches))

    def evaluate(self) -> Record:
        self.states = wait([s.state.remote() for s in self.stages], "collecting stage weights")
        self.model.load_state_dict(self.blocks.model_state([st["model"] for st in self.states]))
        return evaluate(self.model, self.data)

    def save(self, history: list[Record]) -> None:
        checkpoint.write(self.spec.out, {"history": history, "stages": self.states})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def close(self) -> None:
        for stage in self.stages:
            ray.kill(stage)


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
    once, by the driver."""
    options: dict[str, Any] = {"num_cpus": spec.threads_per_worker, "max_restarts": 0,
                               "num_gpus": gpus_per_stage(spec, ray.cluster_resources().get("GPU", 0.0))}
    actor = ray.remote(Stage).options(**options)
    faults = Faults.of(spec)
    blocks = blocks_of(build_model(spec, data), spec.model)
    shapes = boundary_shapes(blocks.seq, data.x_train[:1], bounds)
    k = len(bounds) - 1
    slices = [blocks.seq[bounds[i] : bounds[i + 1]] for i in range(k)]
    return [actor.remote(spec, i, k, layers, [blocks.model_key(n) for n, _ in layers.named_parameters()],
                         data.task, data.x_train if i == 0 else None,
                         data.y_train if i == k - 1 else None, shapes[i], faults)
            for i, layers in enumerate(slices)]


def start(stages: list[ray.actor.ActorHandle], saved: dict[str, Any] | None) -> None:
    """Load the checkpoint, if any, into the new stages and connect them."""
    what = f"the start of {len(stages)} stage actors (other work may hold the cluster's CPUs)"
    loads = [s.load.remote(st) for s, st in zip(stages, saved["stages"], strict=True)] if saved else []
    ip, port = wait([stages[0].address.remote(), *loads], what, START_TIMEOUT_S)[0]
    wait([s.join.remote(ip, port) for s in stages], what, START_TIMEOUT_S)


def run_batches(spec: RunSpec, stages: list[ray.actor.ActorHandle], epoch: int,
                batches: list[torch.Tensor]) -> None:
    """One call per stage per global batch: the stages run the schedule among themselves. Batch
    b+1 is handed out before the driver waits for batch b, so no stage idles while the driver
    learns that b is done. A short last batch of an epoch may have fewer samples than
    micro-batches: the empty ones are skipped."""
    in_flight: list[ray.ObjectRef] = []
    for batch in batches:
        # numpy, not tensors: Ray pickles a torch tensor ~0.6 ms slower, per tensor and per stage
        micro = [m.numpy() for m in torch.tensor_split(batch, spec.microbatches) if len(m)]
        refs = [s.train_step.remote(epoch, micro, len(batch)) for s in stages]
        wait(in_flight, f"a global batch of epoch {epoch}")
        in_flight = refs
    wait(in_flight, f"a global batch of epoch {epoch}")


def pipeline_record(spec: RunSpec, stats: list[dict[str, float]], elapsed: float, steps: int) -> Record:
    """Bubble: the share of the stages' time in the epoch's steps not spent computing (waiting
    for a neighbour or moving tensors), next to GPipe's bound for equal stages and free
    communication."""
    k, m = len(stats), spec.microbatches
    compute = sum(s["compute_s"] for s in stats)
    rec: Record = {"world_size": k, "comm_wait_s": sum(s["comm_s"] for s in stats) / k,
                   "bytes_per_step": sum(s["sent"] for s in stats) / steps,
                   "bubble_fraction": 1 - compute / (k * elapsed),
                   "bubble_bound": (k - 1) / (m + k - 1)}
    for i, s in enumerate(stats):
        rec[f"stage{i}_compute_s"] = s["compute_s"]
        rec[f"stage{i}_comm_s"] = s["comm_s"]
        rec[f"stage{i}_peak_activations"] = s["peak"]
    return rec
