"""The math every strategy shares: data, model and optimizer of a spec, the losses, one step,
one pass over a shard of every global batch, evaluation.

Loss scaling is what makes strategies agree, and it is written once, in `denominator`: every
process divides the SUM of its samples' losses by the global batch, so that the gradients the
strategy sums (ps servers, pipeline micro-batches) are the gradient of the global batch's mean
loss; where the communication AVERAGES over N workers instead (DDP's all-reduce), by
global batch / N, whatever the shard sizes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from raydist.config import RunSpec
from raydist.data import Dataset, load_data
from raydist.engine.levers import Levers, sync_held
from raydist.engine.lr import effective_lr
from raydist.engine.record import Record
from raydist.models import build_model
from raydist.optim import OPTIMIZERS, build_optimizer
from raydist.registry import import_object


def setup(spec: RunSpec) -> tuple[Dataset, nn.Sequential, torch.optim.Optimizer]:
    """Data, model and optimizer of a run, identical in every process given the same spec."""
    data = load_data(spec)
    model = build_model(spec, data)
    return data, model, make_optimizer(spec, model.named_parameters())


def make_optimizer(spec: RunSpec, params: Any) -> torch.optim.Optimizer:
    """The spec's optimizer at the lr scaled for the global batch (engine/lr.py); the run's
    schedule (make_scheduler) then sets each step's lr from it. params: (name, tensor) pairs
    under the model's own names (muon splits by them), or tensors."""
    return build_optimizer(spec.optimizer, params, effective_lr(spec), **spec.optimizer_hparams())


def step_samples(spec: RunSpec, data: Dataset) -> int:
    """Samples per optimizer step: the global batch; gd's the whole training set."""
    return data.n_train if OPTIMIZERS[spec.optimizer].full_batch else spec.global_batch


def global_batches(spec: RunSpec, data: Dataset, epoch: int) -> list[torch.Tensor]:
    """Index batches of `epoch` (of a streamed data set: its batches as they come)."""
    return data.epoch_batches(step_samples(spec, data), spec.seed, epoch)


def total_steps(spec: RunSpec, data: Dataset) -> int:
    """Optimizer steps of the whole run, one per global batch: the lr schedule's horizon."""
    return spec.epochs * len(global_batches(spec, data, 1))


def denominator(global_batch: int, averaged_over: int = 1) -> float:
    """What one process divides its summed loss by (see the module's docstring)."""
    return global_batch / averaged_over


# --- losses: sum over samples of each sample's loss (a sequence's: mean over its tokens) ------

def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    per_sample = y.shape[0] / y.numel() if y.numel() else 1.0  # an empty shard: loss 0, grads 0
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum") * per_sample


def _bce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out, y, reduction="sum")


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y, reduction="sum")


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES: dict[str, Loss] = {"ce": _ce, "bce": _bce, "mse": _mse}


@functools.cache
def loss_fn(task: str) -> Loss:
    """raydist's loss of a task, or a user's own (`loss: mypkg.losses:fn`, the data's task then),
    which keeps the contract: the SUM over the batch's samples."""
    return LOSSES[task] if task in LOSSES else import_object(task, "loss")


CLASSES = ("ce", "bce")
"""The tasks whose records hold val_accuracy."""


def correct(out: torch.Tensor, y: torch.Tensor, task: str) -> float:
    """Share of right predictions (tokens, for sequences)."""
    pred = out.argmax(-1) if task == "ce" else (out > 0).float()
    return (pred == y).float().mean().item()


# --- one step ----------------------------------------------------------------------------------

def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, denom: float,
             levers: Levers | None = None) -> float:
    """Gradients of sum(loss)/denom into .grad; returns sum(loss). With levers.accum k: k
    micro-batches of x, each adding its part (the same denom: they sum to the whole's), the
    model's gradient exchange held back but for the last (engine/levers.py)."""
    levers = levers or Levers()
    model.zero_grad(set_to_none=True)
    parts = list(zip(torch.tensor_split(x, levers.accum), torch.tensor_split(y, levers.accum), strict=True))
    total = 0.0
    for i, (xs, ys) in enumerate(parts):
        with sync_held(model) if i < len(parts) - 1 else contextlib.nullcontext():
            with levers.autocast(xs.device):
                loss = loss_fn(task)(model(xs), ys)
            (loss / denom).backward()
        total += loss.item()
    return total


def step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
         task: str, denom: float, scheduler: LRScheduler | None = None,
         levers: Levers | None = None) -> float:
    """One optimizer step (the gradient's norm measured, and clipped, first; a tp model's
    data-parallel average before that), then one step of the lr schedule (if any) for the next."""
    levers = levers or Levers()
    total = backward(model, x, y, task, denom, levers)
    if levers.reduce is not None:
        levers.reduce()
    levers.clip(model.parameters())
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return total


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: Dataset,
                batches: list[torch.Tensor], rank: int = 0, world: int = 1,
                scheduler: LRScheduler | None = None, levers: Levers | None = None) -> float:
    """One pass; each worker takes its shard of every global batch. Returns this worker's
    sum of per-sample losses."""
    levers = levers or Levers()
    total = 0.0
    for batch in batches:
        x, y = data.rows(batch, rank, world)
        total += step(model, optimizer, x, y, data.task, denominator(len(batch), world), scheduler,
                      levers)
    return total


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch: int = 2048, levers: Levers | None = None) -> Record:
    """Validation loss (and accuracy) in eval mode: BatchNorm uses its running estimates and
    leaves them alone, dropout is off; the model is put back in training mode. The forward in
    the training's precision (levers.autocast)."""
    was = model.training
    model.eval()
    try:
        with (levers or Levers()).autocast(data.x_val.device):
            return _evaluate(model, data, batch)
    finally:
        model.train(was)


def _evaluate(model: nn.Module, data: Dataset, batch: int) -> Record:
    loss, hits = 0.0, 0.0
    for x, y in data.val_batches(batch):
        out = model(x)
        loss += loss_fn(data.task)(out, y).item()
        if data.task in CLASSES:
            hits += correct(out, y, data.task) * len(x)
    rec: Record = {"val_loss": loss / data.n_val}
    if data.task in CLASSES:
        rec["val_accuracy"] = hits / data.n_val
    return rec
