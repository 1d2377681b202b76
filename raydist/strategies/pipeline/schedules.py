"""Pipeline schedules: the order in which one stage runs its micro-batches' forward (F) and
backward (B) ops. Pure Python (no Ray, no torch): `raydist plan` and the tests read them too. A
new schedule is one `register` call."""

from __future__ import annotations

from collections.abc import Callable

from raydist.registry import Registry

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


SCHEDULES: Registry[Callable[[int, int, int], list[Op]]] = Registry("schedule")
SCHEDULES.register("gpipe")(gpipe)
SCHEDULES.register("1f1b")(one_f_one_b)
