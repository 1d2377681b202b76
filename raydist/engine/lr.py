"""The learning rate of every optimizer step: scaled once for the global batch (`lr_scaling`),
then shaped over the run's optimizer steps (`warmup_steps`, `lr_schedule`) by one
`torch.optim.lr_scheduler.LambdaLR`, built here for every strategy (the names and their
factors: raydist/optim/lr_schedules.py) and stepped right after
each optimizer step.

With s the 0-based optimizer step, W = warmup_steps, T the run's total optimizer steps and
lr* = lr x scaling(global_batch / base_batch), step s uses lr* x factor(s):

- warmup, s < W:   factor = (s + 1) / (W + 1): linear from 0, never 0 itself (no step is
  wasted), reaching lr* at step W;
- then, k = s - W of K = T - W steps:  constant 1; cosine 0.5 (1 + cos(pi k / K)), which would
  reach 0 after the last step; step lr_gamma ^ floor(k / lr_step_size).

Every factor is the closed form of the step number alone (LambdaLR), not a chain of updates on
the optimizer's current lr (CosineAnnealingLR's recursion): the lr of a step depends on the
scheduler's step count only, so every ps server and pipeline stage computes the very same lr
as local, and a scheduler restored from its state_dict continues bit for bit whatever the
optimizer's param_groups hold (ps restores per-tensor state only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from raydist.config import RunSpec
from raydist.optim.lr_schedules import LR_SCHEDULES, SCALINGS


def effective_lr(spec: RunSpec) -> float:
    """lr x the lr_scaling factor of global_batch / base_batch: the lr warmup rises to."""
    return spec.lr * SCALINGS[spec.lr_scaling](spec.global_batch / spec.base_batch)


def factor(spec: RunSpec, total_steps: int) -> Callable[[int], float]:
    """The multiplier of lr* at optimizer step s (0-based) of a run of `total_steps` steps."""
    warmup, schedule = spec.warmup_steps, LR_SCHEDULES[spec.lr_schedule].factor
    after = max(1, total_steps - warmup)

    def at(s: int) -> float:
        return (s + 1) / (warmup + 1) if s < warmup else schedule(spec, s - warmup, after)

    return at


def make_scheduler(spec: RunSpec, optimizer: torch.optim.Optimizer, total_steps: int) -> LambdaLR:
    """The run's schedule over `optimizer`, whose param groups start at effective_lr (see
    engine.make_optimizer): call .step() once after every optimizer step. It sets the lr of
    the first step at once."""
    return LambdaLR(optimizer, factor(spec, total_steps))


def restore_scheduler(scheduler: LambdaLR, state: dict[str, Any] | None) -> None:
    """Continue from a checkpointed state_dict (None: a checkpoint from before schedules,
    kept as it is). The optimizer's lr is set from the scheduler: ps servers reload per-tensor
    state only, not the param groups that hold the lr."""
    if state is None:
        return
    scheduler.load_state_dict(state)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
