"""Nothing waits forever: the watchdog every strategy on Ray runs in its driver, and the one line
it prints when no training step has finished for too long, saying from Ray's view what the run
waits on (the pending tasks, actors and placement groups of this job and the resources they ask
for, beside what the cluster has free).

The limit (`Watchdog.limit`): until the first step of an attempt has finished (start-up: Ray
Train's worker group or the actors starting, imports, the first batch, compilation), the larger
of `stall_timeout_s` and START_S (or Ray Train's worker-group start timeout when it is longer, as
on an autoscaling cluster); after it, the larger of `stall_timeout_s` and STEP_MULTIPLE times the
longest step measured since (an attempt's first step is not measured: it carries the warm-up).
The clock runs from the last sign of progress: a step, an evaluation, a checkpoint, an epoch's
record."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray

from raydist.errors import Stalled

START_S = 120.0
"""The least an attempt's first step gets: it includes starting the workers."""
STEP_MULTIPLE = 10.0
"""After the first step, a wait may last this many times the longest step seen."""
POLL_S = 0.5
"""How often a watched wait on Ray looks at the clock."""
BEAT_S = 1.0
"""A Ray Train worker tells the driver about its steps at most this often (never per step)."""
STATE_S = 10.0
"""Bound on each call to Ray's state API while the line is written."""
LISTED = 200
"""The most pending tasks, actors or placement groups read from Ray's state API."""


def start_s() -> float:
    """START_S, or Ray Train's worker-group start timeout if longer (capacity.require raises it
    to NODE_START_S on an autoscaling cluster, where nodes take minutes to boot)."""
    given = os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "")
    try:
        return max(START_S, float(given))
    except ValueError:
        return START_S


class Watchdog:
    """The driver's clock since the last progress of one attempt, and its limit."""

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s, self.clock = timeout_s, clock
        self.restart()

    def restart(self) -> None:
        """A new attempt (actors or a worker group starting again): start-up's limit again."""
        self.last, self.stepped, self.longest = self.clock(), False, 0.0

    def alive(self) -> None:
        """Progress that is not a step: the actors started, an evaluation, a checkpoint."""
        self.last = self.clock()

    def step(self, seconds: float | None = None) -> None:
        """A training step finished; `seconds`: how long it took where the worker measured it
        (else the time since the last progress). An attempt's first step is not measured."""
        now = self.clock()
        if self.stepped:
            self.longest = max(self.longest, now - self.last if seconds is None else seconds)
        self.last, self.stepped = now, True

    @property
    def limit(self) -> float:
        if not self.stepped:
            return max(self.timeout_s, start_s())
        return max(self.timeout_s, STEP_MULTIPLE * self.longest)

    def check(self) -> None:
        """Raise Stalled (the line, with Ray's view) if the limit has passed."""
        idle = self.clock() - self.last
        if idle > self.limit:
            raise Stalled(f"stalled: no training step finished for {idle:.0f} s; waiting on: "
                          f"{ray_view()}")


def wait_all(refs: Sequence[ray.ObjectRef], watch: Watchdog) -> None:
    """Until every ref is ready (done or failed: ray.get then raises its error), looking at the
    watchdog every POLL_S."""
    pending = list(refs)
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S, fetch_local=False)
        if pending:
            watch.check()


def get(refs: Any, watch: Watchdog) -> Any:
    """ray.get(refs) under the watchdog."""
    wait_all(refs if isinstance(refs, list) else [refs], watch)
    return ray.get(refs)


# --- a Ray Train worker's heartbeat -------------------------------------------------------------

class Beats:
    """Wraps an epoch's batches (len, indexing and attributes as they have them): each time the
    trainer asks for the next batch, the step before is done. `send(seconds)`, the longest step
    since the last call, runs at most once per `every` seconds (a fire-and-forget actor call:
    no round trip on the steps' path); the first step is sent at once."""

    def __init__(self, send: Callable[[float], Any], every: float = BEAT_S) -> None:
        self.send, self.every = send, every
        self.sent, self.longest = float("-inf"), 0.0

    def over(self, batches: Sequence[Any]) -> Sequence[Any]:
        return Beating(batches, self)

    def stepped(self, seconds: float) -> None:
        self.longest = max(self.longest, seconds)
        now = time.monotonic()
        if now - self.sent >= self.every:
            self.send(self.longest)
            self.sent, self.longest = now, 0.0


class Beating:
    def __init__(self, batches: Sequence[Any], beats: Beats) -> None:
        self.batches, self.beats = batches, beats

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Any:
        return self.batches[i]

    def __getattr__(self, name: str) -> Any:  # a stream's `samples`, and the like
        return getattr(self.batches, name)

    def __iter__(self) -> Iterator[Any]:
        t = time.monotonic()
        for batch in self.batches:
            yield batch
            now = time.monotonic()
            self.beats.stepped(now - t)
            t = now


# --- what the run waits on, from Ray's view -------------------------------------------------------

def ray_view() -> str:
    """The pending work of this job and the resources it asks for, beside the cluster's."""
    from ray.util.state import list_actors, list_placement_groups, list_tasks

    here = ray.get_runtime_context()
    job = here.get_job_id()
    # this Ray's state API, also where several run on the machine (found through its GCS)
    args = {"address": here.gcs_address, "detail": True, "limit": LISTED, "timeout": STATE_S,
            "raise_on_missing_output": False}
    try:
        tasks = list_tasks(filters=[("state", "=", "PENDING_NODE_ASSIGNMENT"),
                                    ("type", "=", "NORMAL_TASK"), ("job_id", "=", job)], **args)
        actors = list_actors(filters=[("state", "!=", "DEAD"), ("job_id", "=", job)], **args)
        groups = list_placement_groups(filters=[("state", "=", "PENDING"),
                                                ("creator_job_id", "=", job)], **args)
        tasks = owned(tasks, {a.actor_id for a in actors}, args)
    except Exception as e:  # noqa: BLE001 - the line still says what the cluster has
        return (f"unknown (Ray's state API did not answer: {type(e).__name__}); "
                f"{free_line(ray.available_resources(), ray.cluster_resources(), {'CPU'})}")
    return describe(tasks, actors, groups, ray.available_resources(), ray.cluster_resources())


def owned(tasks: list[Any], live: set[str], args: dict[str, Any]) -> list[Any]:
    """The pending tasks whose submitter still lives. Ray drops a dead actor's task requests,
    but its state API keeps showing them as pending: a task submitted from an actor task whose
    actor is gone (an earlier attempt's, an earlier run's in this job) is left out."""
    from ray.util.state import list_tasks

    parents = {t.parent_task_id for t in tasks if t.parent_task_id}
    gone = set()
    for parent in sorted(parents)[:20]:
        rows = list_tasks(filters=[("task_id", "=", parent)], **{**args, "limit": 1})
        if rows and rows[0].actor_id and rows[0].actor_id not in live:
            gone.add(parent)
    return [t for t in tasks if t.parent_task_id not in gone]


PENDING_ACTOR = ("DEPENDENCIES_UNREADY", "PENDING_CREATION")


def describe(tasks: list[Any], actors: list[Any], groups: list[Any], free: dict[str, float],
             total: dict[str, float]) -> str:
    """'2 Ray tasks read need 1 CPU each; ...; CPU: 0 of 2 free, held by 2 RayTrainWorker'."""
    waiting = [("Ray task", f" {t.name}", t.required_resources or {}) for t in tasks]
    waiting += [("actor", f" {a.class_name}", a.required_resources or {}) for a in actors
                if a.state in PENDING_ACTOR]
    waiting += [("placement group", "", bundle_sum(g.bundles or [])) for g in groups]
    alive = [a for a in actors if a.state == "ALIVE"]
    asked = {k for *_, need in waiting for k in need} or {"CPU"}
    counted = Counter((noun, name, tuple(sorted(need.items()))) for noun, name, need in waiting)
    parts = [f"{n} {noun}{'s' if n > 1 else ''}{name} need{'' if n > 1 else 's'} "
             f"{amounts(dict(need))}{' each' if n > 1 else ''}"
             for (noun, name, need), n in counted.items()]
    if not parts:
        parts = ["no task, actor or placement group of this run is pending in Ray (a process is "
                 "blocked inside a step: a collective, I/O, a lock)"]
    return "; ".join([*parts, free_line(free, total, asked, alive)])


def bundle_sum(bundles: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in (b.get("unit_resources") or b).items():
            if isinstance(v, int | float):
                out[k] = out.get(k, 0.0) + v
    return out


def amounts(need: dict[str, float]) -> str:
    """{'CPU': 1.0, 'nonexistent': 1.0} -> '1 CPU, 1 nonexistent'."""
    shown = {k: v for k, v in sorted(need.items()) if v and not k.startswith("node:")}
    return ", ".join(f"{v:g} {k}" for k, v in shown.items()) or "no resources"


def free_line(free: dict[str, float], total: dict[str, float], asked: set[str],
              alive: list[Any] | None = None) -> str:
    """Per resource asked for: what the cluster has free of it and which live actors hold it."""
    out = []
    for name in sorted(asked):
        if not total.get(name):
            out.append(f"no node has {name}")
            continue
        holders = Counter(a.class_name for a in alive or [] if (a.required_resources or {}).get(name))
        held = ", ".join(f"{n} {c}" for c, n in sorted(holders.items()))
        out.append(f"{name}: {free.get(name, 0.0):g} of {total[name]:g} free"
                   + (f", held by {held}" if held else ""))
    return "; ".join(out)
