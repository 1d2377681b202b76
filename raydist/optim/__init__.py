"""Optimizer registry: the article's six update rules, AdamW and LARS for large batches
(`seed.py`), and five newer rules (`recent.py`): Muon (with AdamW beside it), LAMB, Adafactor,
Lion and schedule-free AdamW. docs/design.md, "Optimizers", gives every formula;
tests/test_optim.py checks each against numpy.

Every rule acts on each tensor on its own, so a ps server stepping its shard, or a pipeline stage
its blocks, computes what one optimizer over the whole model does. Muon needs to know which
tensors are hidden matrices: `build_optimizer` takes (name, tensor) pairs, as
`named_parameters()` gives them, and every strategy passes the model's own names
(`recent.hidden_matrix` is the rule).

An optimizer may keep two sets of weights, one to take gradients at and one to evaluate
(schedule-free). Outside `training(...)` the parameters hold the weights to evaluate and save;
each strategy wraps an epoch's steps in it (entry.train before, entry.eval after).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from raydist.registry import Registry

Params = Iterable[torch.Tensor]
Named = Iterable[tuple[str, torch.Tensor] | torch.Tensor]


def unchanged(optimizer: torch.optim.Optimizer) -> None:
    """The mode switch of an optimizer with one set of weights: nothing to do."""


@dataclass(frozen=True)
class OptimizerEntry:
    build: Callable[..., torch.optim.Optimizer]
    default_lr: float
    """Documented default: lowers the training loss of the mlp on digits in a few epochs."""
    full_batch: bool = False
    """gd: the engine feeds the whole training set as one batch."""
    named: bool = False
    """build takes (name, tensor) pairs (a name is '' where the caller gave none), not tensors."""
    train: Callable[[torch.optim.Optimizer], None] = unchanged
    """Before an epoch's steps: the parameters become the weights gradients are taken at."""
    eval: Callable[[torch.optim.Optimizer], None] = unchanged
    """After them: the parameters become the weights evaluated, checkpointed and saved."""
    state: float | Callable[[str, torch.Tensor], float] = 0.0
    """Bytes of optimizer state it keeps per byte of a parameter (Adam's m and v: 2), or that
    per (name, tensor) where it depends on the tensor (muon, adafactor): what `raydist plan`
    and the pre-flight predict a worker holds (raydist/memory/footprint.py); per-tensor scalars (a step
    count) are left out. tests/test_memory.py checks each against the state after a step."""

    def state_bytes(self, name: str, p: torch.Tensor) -> float:
        """Predicted optimizer-state bytes of parameter `p` (named as in the model)."""
        factor = self.state(name, p) if callable(self.state) else self.state
        return factor * p.numel() * p.element_size()


OPTIMIZERS: Registry[OptimizerEntry] = Registry("optimizer")


class PerTensor(torch.optim.Optimizer):
    """An update rule written per tensor (the ones torch lacks): `update(p, group, state)`
    steps one parameter that has a gradient, under no_grad."""

    def update(self, p: torch.Tensor, group: dict, state: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, group, self.state[p])
        return loss


def build_optimizer(name: str, params: Named, lr: float, **hparams: float) -> torch.optim.Optimizer:
    """The optimizer `name` over `params` (tensors, or (name, tensor) pairs as
    `named_parameters()` gives them); hparams: beta, beta1, beta2, eps, weight_decay."""
    entry = OPTIMIZERS[name]
    pairs = [p if isinstance(p, tuple) else ("", p) for p in params]
    return entry.build(pairs if entry.named else [p for _, p in pairs], lr=lr, **hparams)


def unshardable(name: str) -> str:
    """Why torch's ZeroRedundancyOptimizer cannot hold the rule `name` ('' if it can): it hands
    each rank's rule unnamed tensors of that rank's share, so neither a rule that tells tensors
    apart by name (muon) nor one that moves every parameter around an epoch (schedule-free)
    works there."""
    entry = OPTIMIZERS[name]
    if entry.named:
        return "tells its matrices apart by the parameters' names"
    if entry.train is not unchanged:
        return "switches every parameter between two sets of weights around an epoch"
    return ""


@contextmanager
def training(name: str, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Around an epoch's steps: the optimizer's training mode (schedule-free moves the
    parameters from x, the weights to evaluate, to y, where it takes gradients, and back)."""
    OPTIMIZERS[name].train(optimizer)
    try:
        yield
    finally:
        OPTIMIZERS[name].eval(optimizer)


# each registers its optimizers, in the order names are listed: the seed eight first
from raydist.optim import seed  # noqa: E402,F401

# isort: split
from raydist.optim import recent  # noqa: E402,F401

__all__ = ["OPTIMIZERS", "OptimizerEntry", "Params", "build_optimizer", "training", "unchanged",
           "unshardable"]
