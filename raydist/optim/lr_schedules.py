"""The names `lr_scaling` and `lr_schedule` take, and what each means: pure registries, so that
config can check a spec's names against them (config sits above optim). engine/lr.py builds
the run's scheduler from them; its docstring gives the formulas."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raydist.registry import Registry

if TYPE_CHECKING:  # annotations only: config sits above this layer and imports it
    from raydist.config import RunSpec

SCALINGS: Registry[Callable[[float], float]] = Registry("lr_scaling")
"""lr_scaling: the factor lr is multiplied by, given global_batch / base_batch."""
SCALINGS.register("none")(lambda ratio: 1.0)
SCALINGS.register("linear")(lambda ratio: ratio)  # Goyal et al. 2017, with warmup
SCALINGS.register("sqrt")(math.sqrt)  # Krizhevsky 2014; Hoffer et al. 2017 (adaptive optimizers)


@dataclass(frozen=True)
class LRSchedule:
    factor: Callable[[RunSpec, int, int], float]
    """(spec, k, K) -> lr multiplier at step k of the K steps after warmup"""
    spans_run: bool = False
    """whether K matters: the schedule then depends on the run's epochs, which a resumed run
    cannot change"""


LR_SCHEDULES: Registry[LRSchedule] = Registry("lr_schedule")
LR_SCHEDULES.register("constant")(LRSchedule(lambda spec, k, n: 1.0))
LR_SCHEDULES.register("cosine")(LRSchedule(lambda spec, k, n: 0.5 * (1.0 + math.cos(math.pi * k / n)),
                                         spans_run=True))
LR_SCHEDULES.register("step")(LRSchedule(lambda spec, k, n: spec.lr_gamma ** (k // spec.lr_step_size)))
