"""The training step and the epoch loop every strategy shares, and the per-epoch record.

Loss scaling is what makes strategies agree: a worker's loss is the SUM of its samples'
losses divided by `denom`. With `denom = global_batch / world`, DDP's gradient average
equals the single-process gradient of the global batch, whatever the shard sizes.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from raydist.config import RunSpec
from raydist.data import Dataset, batch_order, load_data, shard
from raydist.models import build_model
from raydist.optim import OPTIMIZERS, build_optimizer

Record = dict[str, Any]
Report = Callable[[Record], None]


class Diverged(RuntimeError):
    """The training loss became NaN or infinite; the run stops after reporting that epoch."""


@dataclass
class RunResult:
    metrics: list[Record]
    state_dict: dict[str, torch.Tensor]


def setup(spec: RunSpec) -> tuple[Dataset, nn.Sequential, torch.optim.Optimizer]:
    """Data, model and optimizer of a run, identical in every process given the same spec."""
    data = load_data(spec)
    model = build_model(spec, data)
    return data, model, make_optimizer(spec, model.parameters())


def make_optimizer(spec: RunSpec, params: Any) -> torch.optim.Optimizer:
    return build_optimizer(spec.optimizer, params, spec.lr, **spec.optimizer_hparams())


def global_batches(spec: RunSpec, data: Dataset, epoch: int) -> list[torch.Tensor]:
    """Index batches of `epoch`; gd takes the whole training set as one batch."""
    size = data.n_train if OPTIMIZERS[spec.optimizer].full_batch else spec.batch_size
    return batch_order(data.n_train, size, spec.seed, epoch)


# --- losses: sum over samples of each sample's loss (a sequence's: mean over its tokens) ------

def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum") * (
        y.shape[0] / y.numel())


def _bce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out, y, reduction="sum")


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y, reduction="sum")


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": _ce, "bce": _bce, "mse": _mse}


def correct(out: torch.Tensor, y: torch.Tensor, task: str) -> float:
    """Share of right predictions (tokens, for sequences)."""
    pred = out.argmax(-1) if task == "ce" else (out > 0).float()
    return (pred == y).float().mean().item()


# --- one step ----------------------------------------------------------------------------------

def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, denom: float) -> float:
    """Gradients of sum(loss)/denom into .grad; returns sum(loss)."""
    model.zero_grad(set_to_none=True)
    total = LOSSES[task](model(x), y)
    (total / denom).backward()
    return total.item()


def step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
         task: str, denom: float) -> float:
    total = backward(model, x, y, task, denom)
    optimizer.step()
    return total


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: Dataset,
                batches: list[torch.Tensor], rank: int = 0, world: int = 1) -> float:
    """One pass; each worker takes its shard of every global batch. Returns this worker's
    sum of per-sample losses."""
    total = 0.0
    for batch in batches:
        idx = shard(batch, rank, world)
        total += step(model, optimizer, data.x_train[idx], data.y_train[idx], data.task,
                      len(batch) / world)
    return total


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch: int = 2048) -> Record:
    loss, hits = 0.0, 0.0
    for i in range(0, len(data.x_val), batch):
        x, y = data.x_val[i : i + batch], data.y_val[i : i + batch]
        out = model(x)
        loss += LOSSES[data.task](out, y).item()
        if data.task != "mse":
            hits += correct(out, y, data.task) * len(x)
    rec: Record = {"val_loss": loss / len(data.x_val)}
    if data.task != "mse":
        rec["val_accuracy"] = hits / len(data.x_val)
    return rec


# --- the epoch loop ----------------------------------------------------------------------------

def make_record(epoch: int, train_loss: float, val: Record, samples: int, epoch_time: float,
                wall_time: float) -> Record:
    return {"epoch": epoch, "train_loss": train_loss, **val,
            "samples_per_s": samples / epoch_time, "epoch_time_s": epoch_time,
            "wall_time_s": wall_time}


def fit(spec: RunSpec, data: Dataset, model: nn.Module, optimizer: torch.optim.Optimizer,
        report: Report, *, rank: int = 0, world: int = 1, history: list[Record] | None = None,
        reduce: Callable[[float], float] = float,
        on_epoch_end: Callable[[Record, list[Record]], None] | None = None) -> list[Record]:
    """Train from epoch len(history)+1 to spec.epochs. `reduce` sums a float over workers;
    `on_epoch_end` (checkpoints) sees each record and the history so far."""
    history = list(history or [])
    start = time.perf_counter() - (history[-1]["wall_time_s"] if history else 0.0)
    for epoch in range(len(history) + 1, spec.epochs + 1):
        batches = global_batches(spec, data, epoch)
        t = time.perf_counter()
        loss = reduce(train_epoch(model, optimizer, data, batches, rank, world))
        elapsed = time.perf_counter() - t
        rec = make_record(epoch, loss / data.n_train, evaluate(model, data), data.n_train,
                          elapsed, time.perf_counter() - start)
        history.append(rec)
        report(rec)
        if not math.isfinite(rec["train_loss"]):
            raise Diverged(f"training loss is {rec['train_loss']} at epoch {epoch}")
        if on_epoch_end:
            on_epoch_end(rec, history)
    return history


# --- outputs -----------------------------------------------------------------------------------

def machine_info(spec: RunSpec) -> Record:
    import ray

    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if "model name" in line),
               platform.processor())
    return {"host": platform.node(), "cpu_model": cpu, "cpus": os.cpu_count(),
            "gpus": torch.cuda.device_count(), "threads_per_worker": spec.threads_per_worker,
            "python": platform.python_version(), "torch": str(torch.__version__),
            "ray": ray.__version__}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def save_outputs(out: Path, spec: RunSpec, result: RunResult) -> None:
    """spec.yaml, metrics.csv, model.pt and machine.yaml: the same files for every strategy."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    spec.save(out / "spec.yaml")
    pd.DataFrame(result.metrics).to_csv(out / "metrics.csv", index=False)
    torch.save({k: v.detach().cpu() for k, v in result.state_dict.items()}, out / "model.pt")
    (out / "machine.yaml").write_text(yaml.safe_dump(machine_info(spec), sort_keys=False))
