"""Pipeline schedules: the order in which one stage actor runs its micro-batches' forward (F),
backward (B) and, for zero-bubble schedules, weight-gradient (W) ops, on each of its chunks.
Pure Python (no Ray, no torch): `raydist plan`, the timeline and the tests read them too. A new
schedule is one `register` call of a `Schedule` entry.

A stage actor holds one chunk of contiguous blocks, or, under an interleaved schedule, V chunks
that are not adjacent (as Megatron-LM and torch's ScheduleInterleaved1F1B do): with K actors,
chunk c of actor k is virtual stage c*K + k, and a micro-batch passes virtual stages 0..K*V-1.
`simulate` runs the K actors' op lists against each other (an op waits for the ops whose
tensors it needs), so a schedule that would deadlock is found without Ray, and gives the ideal
timeline of a schedule (equal stages, free communication) that the report draws beside the
measured one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from raydist.registry import Registry

Op = tuple[str, int, int]
"""(kind, micro-batch, chunk): kind F (forward), B (backward; under a split backward only the
input's gradient) or W (the weights' gradient of a split backward)."""

COST = {"F": 1.0, "B": 2.0}
"""Op times of the ideal timeline, in units of a forward: a backward costs two forwards."""
SPLIT_COST = {"F": 1.0, "B": 1.0, "W": 1.0}
"""The same under a split backward: the input's and the weights' gradients, one forward each."""


@dataclasses.dataclass(frozen=True)
class Schedule:
    ops: Callable[[int, int, int, int], list[Op]]
    """ops(stage, stages, m, chunks): one actor's ops for a global batch of m micro-batches"""
    bound: Callable[[int, int, int], float]
    """bound(stages, m, chunks): the ideal bubble, a share of the stages' time (the record's)"""
    chunks: int = 1
    """chunks per actor when `virtual_stages` is not set"""
    interleaved: bool = False
    """whether the schedule runs several chunks per actor (virtual stages)"""
    split_backward: bool = False
    """whether B computes only the input's gradient and W the weights' (zero bubble)"""

    def cost(self) -> dict[str, float]:
        return SPLIT_COST if self.split_backward else COST


def gpipe(stage: int, stages: int, m: int, chunks: int = 1) -> list[Op]:
    """All forwards, then all backwards: every stage holds all M micro-batches' activations."""
    return [("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)]


def one_f_one_b(stage: int, stages: int, m: int, chunks: int = 1) -> list[Op]:
    """Warm up with as many forwards as stages downstream, then alternate one forward, one
    backward: a stage never holds more than `stages` micro-batches' activations."""
    warmup = min(stages - stage - 1, m)
    ops = [("F", i, 0) for i in range(warmup)]
    for i in range(m - warmup):
        ops += [("F", warmup + i, 0), ("B", i, 0)]
    return ops + [("B", i, 0) for i in range(m - warmup, m)]


def interleaved_1f1b(stage: int, stages: int, m: int, chunks: int) -> list[Op]:
    """Megatron-LM's interleaved 1F1B: micro-batches in groups of K (the last may be smaller)
    pass all V chunks of an actor group by group; warm up with 2(K-k-1) + (V-1)K forwards, then
    alternate. The bubble shrinks V-fold: (K-1)/(V*M) of the compute time."""
    order = [(i, c) for start in range(0, m, stages) for c in range(chunks)
             for i in range(start, min(start + stages, m))]
    forwards = [("F", i, c) for i, c in order]
    backwards = [("B", i, chunks - 1 - c) for i, c in order]
    total = len(order)
    warmup = min(2 * (stages - stage - 1) + (chunks - 1) * stages, total)
    ops = forwards[:warmup]
    for i in range(total - warmup):
        ops += [forwards[warmup + i], backwards[i]]
    return ops + backwards[total - warmup:]


def zb_h1(stage: int, stages: int, m: int, chunks: int = 1) -> list[Op]:
    """ZB-H1 (Qi et al., zero bubble): 1F1B with each backward split in two; stage k defers its
    weight passes by k backwards, so that the input gradients flow upstream first and the weight
    passes fill the cool-down's waits; no stage holds more than K micro-batches (1F1B's most)."""
    delay = stage
    ops: list[Op] = []
    backs = 0
    for op in one_f_one_b(stage, stages, m):
        ops.append(op)
        if op[0] == "B":
            backs += 1
            if backs > delay:
                ops.append(("W", backs - delay - 1, 0))
    return ops + [("W", i, 0) for i in range(max(0, m - delay), m)]


def flush_bound(stages: int, m: int, chunks: int) -> float:
    """GPipe, 1F1B, interleaved 1F1B: the bubble is (K-1)/(V*M) of the compute time (V = 1 but
    interleaved), (K-1)/(V*M+K-1) of the stages' time."""
    return (stages - 1) / (chunks * m + stages - 1)


def zero_bubble_bound(stages: int, m: int, chunks: int) -> float:
    """ZB-H1 with F, B and W of equal time (as the paper takes them): each stage's bubble of
    (K-1)(F+B-W) against M(F+B+W) of compute."""
    return (stages - 1) / (3 * m + stages - 1)


SCHEDULES: Registry[Schedule] = Registry("schedule")
SCHEDULES.register("gpipe")(Schedule(gpipe, flush_bound))
SCHEDULES.register("1f1b")(Schedule(one_f_one_b, flush_bound))
SCHEDULES.register("interleaved-1f1b")(Schedule(interleaved_1f1b, flush_bound, chunks=2, interleaved=True))
SCHEDULES.register("zb-h1")(Schedule(zb_h1, zero_bubble_bound, split_backward=True))


def bubble_bound(schedule: str, stages: int, m: int, chunks: int) -> float:
    """The schedule's ideal bubble as a share of the stages' time (equal stages, free
    communication): the record's bubble_bound."""
    return SCHEDULES[schedule].bound(stages, m, chunks)


def chunks_of(schedule: str, virtual_stages: int | None) -> int:
    """Chunks per actor: `virtual_stages`, or the schedule's own number when it is not set."""
    return virtual_stages if virtual_stages is not None else SCHEDULES[schedule].chunks


# --- the ideal timeline: the actors' op lists played against each other -----------------------

Timed = tuple[str, int, int, float, float]
"""(kind, micro-batch, chunk, start, end)"""


class Deadlock(RuntimeError):
    """No actor can run its next op: each waits for a tensor that another has not yet made."""


def needs(op: Op, stage: int, stages: int, chunks: int) -> list[tuple[int, Op]]:
    """(actor, op) pairs whose results `op` on `stage` needs: its input from the virtual stage
    before (F), its output's gradient from the one after (B), its own backward (W)."""
    kind, mb, c = op
    s, last = c * stages + stage, stages * chunks - 1
    if kind == "F":
        return [] if s == 0 else [((s - 1) % stages, ("F", mb, (s - 1) // stages))]
    if kind == "W":
        return [(stage, ("B", mb, c))]
    own = [(stage, ("F", mb, c))]
    return own if s == last else [*own, ((s + 1) % stages, ("B", mb, (s + 1) // stages))]


def simulate(schedule: str, stages: int, m: int, chunks: int = 1) -> list[list[Timed]]:
    """Each actor's ops with start and end times (units of COST), every op as early as its
    actor and its inputs allow; Deadlock if the op lists cannot all finish."""
    entry = SCHEDULES[schedule]
    cost = entry.cost()
    lists = [entry.ops(k, stages, m, chunks) for k in range(stages)]
    done: dict[tuple[int, Op], float] = {}
    timed: list[list[Timed]] = [[] for _ in range(stages)]
    free = [0.0] * stages
    while any(len(timed[k]) < len(lists[k]) for k in range(stages)):
        moved = False
        for k in range(stages):
            while len(timed[k]) < len(lists[k]):
                op = lists[k][len(timed[k])]
                inputs = needs(op, k, stages, chunks)
                if not all(dep in done for dep in inputs):
                    break
                start = max([free[k], *(done[dep] for dep in inputs)])
                free[k] = done[(k, op)] = start + cost[op[0]]
                timed[k].append((*op, start, free[k]))
                moved = True
        if not moved:
            stuck = {k: lists[k][len(timed[k])] for k in range(stages) if len(timed[k]) < len(lists[k])}
            raise Deadlock(f"{schedule} with {stages} stages, {m} micro-batches, {chunks} chunks: "
                           f"stuck at {stuck}")
    return timed


def idle_share(timeline: list[list[Timed]]) -> float:
    """The share of the actors' time (from the first op's start to the last op's end) in no op."""
    start = min(ops[0][3] for ops in timeline if ops)
    end = max(ops[-1][4] for ops in timeline if ops)
    busy = sum(e - s for ops in timeline for *_, s, e in ops)
    return 1 - busy / (len(timeline) * (end - start))


def micro_count(schedule: str, stages: int, m: int, samples: int) -> int:
    """The micro-batches a global batch of `samples` samples is split into: M, fewer for a short
    batch (never an empty one). Interleaved schedules run whole groups of K micro-batches (or
    fewer than K): with a partial group, some (K, V, M) deadlock."""
    n = min(m, samples)
    if SCHEDULES[schedule].interleaved and n >= stages:
        n -= n % stages
    return n
