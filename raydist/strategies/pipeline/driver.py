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

from raydist import memory
from raydist.config import RunSpec
from raydist.data import Dataset
from raydist.engine import Record, checkpoint, evaluate, total_steps
from raydist.engine.progress import steps
from raydist.models import build_model
from raydist.runtime.faults import Faults
from raydist.runtime.members import Members
from raydist.runtime.stall import POLL_S, Watchdog
from raydist.strategies.pipeline import events, gpus_per_stage
from raydist.strategies.pipeline.cuts import Blocks, blocks_of, boundary_shapes
from raydist.strategies.pipeline.schedules import bubble_bound, chunks_of, micro_count
from raydist.strategies.pipeline.stage import Place, Stage, merged

PEER_DEATH_S = 30.0
"""How long a stage's failure waits for Ray to report a dead neighbour as its cause."""
LOST = (RayActorError, ObjectLostError)
"""What a dead stage looks like to the driver: its own calls fail, and so do the calls that
read an object it owned (a RayTaskError of that cause is also an instance of it)."""


def lost(e: BaseException) -> bool:
    return isinstance(e, LOST)


class Pipeline:
    """The stage actors of one attempt (R replicas x K stages, in rank order), and the driver's
    copy of the model, reassembled from replica 0's stages after every epoch (under the model's
    own keys) to evaluate it."""

    def __init__(self, spec: RunSpec, data: Dataset, model: nn.Module, blocks: Blocks,
                 bounds: list[int], saved: dict[str, Any] | None) -> None:
        self.spec, self.data, self.model, self.blocks = spec, data, model, blocks
        self.stages = spawn(spec, data, bounds)
        self.states: list[dict[str, Any]] = []
        self.watch = Watchdog(spec.stall_timeout_s)  # every wait on the stages goes through it
        try:
            self.members = start(self.stages, saved, spec.stages, self.watch)
        except BaseException:
            self.close()
            raise

    def train_epoch(self, epoch: int, batches: list[torch.Tensor]) -> tuple[float, Record]:
        wait([s.train_mode.remote() for s in self.stages], self.watch)
        t = time.perf_counter()
        record_at = self.spec.timeline_step - (epoch - 1) * len(batches) - 1
        run_batches(self.spec, self.stages, epoch, steps(batches, epoch), record_at,  # a bar at a terminal
                    self.watch)
        elapsed = time.perf_counter() - t  # the steps alone: what the bubble is a share of
        stats = wait([s.end_epoch.remote() for s in self.stages], self.watch)
        if 0 <= record_at < len(batches):
            write_events(self.spec, epoch, self.spec.timeline_step, len(batches[record_at]), stats)
        k = self.spec.stages
        loss = sum(s["loss"] for i, s in enumerate(stats) if i % k == k - 1)
        return loss, pipeline_record(self.spec, stats, elapsed, len(batches))

    def evaluate(self) -> Record:
        first = self.stages[: self.spec.stages]  # every replica holds the same weights
        self.states = wait([s.state.remote() for s in first], self.watch)
        self.model.load_state_dict(self.blocks.model_state([st["model"] for st in self.states]))
        return evaluate(self.model, self.data)

    def save(self, history: list[Record]) -> None:
        checkpoint.write(self.spec.out, {"history": history, "stages": self.states})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def close(self) -> None:
        for stage in self.stages:
            ray.kill(stage)

    def who_died(self, e: BaseException) -> str:
        return self.members.who(e)


def finished(refs: list[ray.ObjectRef], timeout: float = float("inf"),
             watch: Watchdog | None = None) -> Iterator[ray.ObjectRef]:
    """`refs` in the order they finish, until `timeout` seconds have passed or `watch` says
    the run is stalled (raises raydist.runtime.stall.Stalled)."""
    deadline, pending = time.monotonic() + timeout, list(refs)
    while pending:
        left = deadline - time.monotonic()
        done, pending = ray.wait(pending, timeout=max(0.0, min(left, POLL_S)))
        if done:
            yield done[0]
        elif left <= POLL_S:
            return
        elif watch is not None:
            watch.check()


def wait(refs: list[ray.ObjectRef], watch: Watchdog, step: bool = False) -> list[Any]:
    """All results, or the first failure as soon as it happens; under the watchdog, and the
    answers are progress (`step`: a training step). A stage whose neighbour died fails too (its
    connection closed); Ray reports the dead stage a moment later, and that is the error raised,
    so that the run restarts rather than ends."""
    pending = set(refs)
    for ref in finished(refs, watch=watch):
        pending.discard(ref)
        try:
            ray.get(ref)
        except LOST:
            raise
        except ray.exceptions.RayTaskError as e:
            raise death_among(list(pending)) or e from None
    if step:
        watch.step()
    else:
        watch.alive()
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
    """R x K actors in rank order (replica-major), each given its chunks of a freshly built
    model (the weights local starts from) and, first and last stage, the training inputs and
    targets: the data set is read once, by the driver, and put in the object store once.
    Replicas spread over the nodes (Ray's SPREAD), each actor on its own cores."""
    # not inside a Tune trial's placement group, which holds its driver only
    options: dict[str, Any] = {"num_cpus": spec.threads_per_worker, "max_restarts": 0,
                               "scheduling_strategy": "SPREAD" if spec.replicas > 1 else "DEFAULT",
                               "num_gpus": gpus_per_stage(spec, ray.cluster_resources().get("GPU", 0.0))}
    actor = ray.remote(Stage).options(**options)
    faults = Faults.of(spec)
    blocks = blocks_of(build_model(spec, data), spec.model)
    shapes = boundary_shapes(blocks.seq, data.x_train[:1], bounds)
    k, v, steps = spec.stages, (len(bounds) - 1) // spec.stages, total_steps(spec, data)
    x, y = ray.put(data.x_train), ray.put(data.y_train)
    actors = []
    for r in range(spec.replicas):
        for i in range(k):
            place = Place(i, k, r, spec.replicas, v)
            chunks = [blocks.seq[bounds[place.virtual(c)] : bounds[place.virtual(c) + 1]] for c in range(v)]
            # its parameters' names in the whole model, in the stage's order (muon splits by them)
            names = [blocks.model_key(n) for n, _ in merged(chunks).named_parameters()]
            actors.append(actor.remote(spec, place, chunks, names, data.task, x if i == 0 else None,
                                       y if i == k - 1 else None,
                                       [shapes[place.virtual(c)] for c in range(v)], faults, steps))
    return actors


def start(stages: list[ray.actor.ActorHandle], saved: dict[str, Any] | None, k: int,
          watch: Watchdog) -> Members:
    """Load the checkpoint, if any, into the new stages (every replica of stage position i the
    saved stage i) and connect them; who is who."""
    loads = [s.load.remote(saved["stages"][i % k]) for i, s in enumerate(stages)] if saved else []
    idents = [s.whoami.remote() for s in stages]
    (ip, port), *rest = wait([stages[0].address.remote(), *idents, *loads], watch)
    wait([s.join.remote(ip, port) for s in stages], watch)
    members = Members("a pipeline stage")
    for i, ident in enumerate(rest[: len(stages)]):
        replica = f" of replica {i // k}" if len(stages) > k else ""
        members.add(f"pipeline stage {i % k}{replica}", ident)
    return members


def run_batches(spec: RunSpec, stages: list[ray.actor.ActorHandle], epoch: int,
                batches: list[torch.Tensor], record_at: int, watch: Watchdog) -> None:
    """One call per stage actor per global batch: each replica takes its share of the batch,
    and its stages run the schedule among themselves. Batch b+1 is handed out before the driver
    waits for batch b, so no stage idles while the driver learns that b is done. A short batch
    is split into fewer micro-batches, never an empty one (schedules.micro_count); a replica
    whose share is empty only adds zeros to the gradients. Batch `record_at` is recorded."""
    in_flight: list[ray.ObjectRef] = []
    k = spec.stages
    for b, batch in enumerate(batches):
        refs = []
        for r, share in enumerate(torch.tensor_split(batch, spec.replicas)):
            n = micro_count(spec.schedule, k, spec.microbatches, len(share))
            # numpy, not tensors: Ray pickles a torch tensor ~0.6 ms slower, per tensor and per stage
            micro = [m.numpy() for m in torch.tensor_split(share, n)] if n else []
            refs += [s.train_step.remote(epoch, micro, len(batch), b == record_at)
                     for s in stages[r * k : (r + 1) * k]]
        wait(in_flight, watch, step=bool(in_flight))
        in_flight = refs
    wait(in_flight, watch, step=True)


def write_events(spec: RunSpec, epoch: int, step: int, samples: int, stats: list[dict[str, Any]]) -> None:
    k = spec.stages
    head = {"epoch": epoch, "step": step, "schedule": spec.schedule, "stages": k,
            "replicas": spec.replicas, "chunks": chunks_of(spec.schedule, spec.virtual_stages),
            "microbatches": micro_count(spec.schedule, k, spec.microbatches, samples // spec.replicas)}
    events.write(spec.out, head, [{"replica": i // k, "stage": i % k, "node": s["node"],
                                   "events": s["events"]} for i, s in enumerate(stats)])


def pipeline_record(spec: RunSpec, stats: list[dict[str, Any]], elapsed: float, steps: int) -> Record:
    """Bubble: the share of the stage actors' time in the epoch's steps not spent computing
    (waiting for a neighbour, moving tensors, the replicas' all-reduce), next to the ideal
    bubble of the schedule for equal stages and free communication. Per stage position: the
    mean over its replicas (activations: the most)."""
    k, n = spec.stages, len(stats)
    chunks = chunks_of(spec.schedule, spec.virtual_stages)
    compute = sum(s["compute_s"] for s in stats)
    rec: Record = {"world_size": n, "comm_wait_s": sum(s["comm_s"] for s in stats) / n,
                   "bytes_per_step": sum(s["sent"] for s in stats) / steps,
                   "bubble_fraction": 1 - compute / (n * elapsed),
                   "bubble_bound": bubble_bound(spec.schedule, k, spec.microbatches, chunks)}
    for i in range(k):
        mine = stats[i::k]
        rec[f"stage{i}_compute_s"] = sum(s["compute_s"] for s in mine) / len(mine)
        rec[f"stage{i}_comm_s"] = sum(s["comm_s"] for s in mine) / len(mine)
        rec[f"stage{i}_peak_activations"] = max(s["peak"] for s in mine)
    names = [f"stage {i % k}" + (f" of replica {i // k}" if n > k else "") for i in range(n)]
    return {**rec, **memory.record_fields({name: s["memory"] for name, s in zip(names, stats, strict=True)})}
