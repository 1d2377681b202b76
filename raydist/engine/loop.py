"""THE epoch loop. Every strategy drives it through a `Trainer`: ddp inside each Ray Train
worker, ps and pipeline in the driver around their actors, local in-process.

The order is written once, here: train, evaluate, stop on a non-finite loss (that epoch is
reported, never checkpointed), checkpoint, report. The actor strategies (ps, pipeline) also
share `fit_restarting` and its policy (`Restarts`): after a death, new actors start from the
latest checkpoint.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from raydist.config import RunSpec
from raydist.data import Dataset
from raydist.engine import checkpoint
from raydist.engine.lr import effective_lr
from raydist.engine.record import Record, make_record
from raydist.engine.step import global_batches, step_samples

Report = Callable[[Record], None]
StateDict = dict[str, torch.Tensor]
START_RETRIES = 3
"""Restarts whose new actors die before they ever run (placed on a node that has just died but
that Ray has not yet declared dead: seconds) are retried this often, apart from max_failures."""


class Diverged(RuntimeError):
    """The training loss became NaN or infinite; the run stops after reporting that epoch.
    `history`: the records up to and including it, where the loop that raised knows them."""

    def __init__(self, message: str, history: list[Record] | None = None) -> None:
        super().__init__(message)
        self.history = list(history or [])


@dataclass
class RunResult:
    metrics: list[Record]
    state_dict: StateDict
    """the model's state_dict under local's keys, whatever strategy trained it"""


class Trainer(Protocol):
    """A strategy's side of the epoch loop."""

    def train_epoch(self, epoch: int, batches: list[torch.Tensor]) -> tuple[float, Record]:
        """Train on the epoch's global batches. Returns the sum of the per-sample training
        losses over all processes, and the strategy's measurements for the record
        (comm_wait_s, bytes_per_step, ...: see engine/record.py)."""

    def evaluate(self) -> Record:
        """val_loss (and val_accuracy) of the model as it is now."""

    def save(self, history: list[Record]) -> None:
        """Checkpoint the state reached at the end of epoch history[-1]['epoch']."""


def fit(spec: RunSpec, data: Dataset, trainer: Trainer, report: Report,
        history: list[Record] | None = None) -> list[Record]:
    """Train from epoch len(history)+1 to spec.epochs; returns the whole history."""
    history = list(history or [])
    start = time.perf_counter() - (history[-1]["wall_time_s"] if history else 0.0)
    for epoch in range(len(history) + 1, spec.epochs + 1):
        try:
            fit_epoch(spec, data, trainer, report, history, epoch, start)
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: the CLI says where the run stopped
            e.epoch = getattr(e, "epoch", None) or epoch  # type: ignore[attr-defined]
            raise
    return history


def fit_epoch(spec: RunSpec, data: Dataset, trainer: Trainer, report: Report, history: list[Record],
              epoch: int, start: float) -> None:
    """One epoch of `fit`: train, evaluate, stop if diverged, checkpoint, report."""
    batches = global_batches(spec, data, epoch)
    t = time.perf_counter()
    loss, measured = trainer.train_epoch(epoch, batches)
    elapsed = time.perf_counter() - t
    batch = {"global_batch": step_samples(spec, data), "effective_lr": effective_lr(spec)}
    rec = make_record(epoch, loss / data.n_train, trainer.evaluate(), data.n_train, elapsed,
                      time.perf_counter() - start, {**batch, **measured})
    history.append(rec)
    if not math.isfinite(rec["train_loss"]):
        report(rec)
        raise Diverged(f"training loss is {rec['train_loss']} at epoch {epoch}", history)
    trainer.save(history)
    report(rec)


class Group(Trainer, Protocol):
    """The actors of one attempt of an actor strategy."""

    def state_dict(self) -> StateDict:
        """The model as the actors hold it, under local's keys."""

    def close(self) -> None:
        """Kill the actors."""

    def who_died(self, e: BaseException) -> str:
        """The actor whose death `e` reports, for the user: 'ps replica 1 (pid 1234)'."""


def announce(line: str) -> None:
    """One line for the user, on stderr beside the epoch lines: what the run does about a
    failure. Ray's own account of it (tracebacks) goes to the run's ray.log."""
    print(line, file=sys.stderr, flush=True)


def restart_line(attempt: int, limit: int, what: str, epoch: int, how: str = "died") -> str:
    """`epoch`: the first epoch the restarted run trains (the checkpoint holds those before)."""
    return f"restart {attempt}/{limit}: {what} {how}; resuming from epoch {epoch}"


class Restarts:
    """Counts an actor strategy's restarts: actors that die before they start (retried
    START_RETRIES times) apart from deaths while training (retried spec.max_failures times)."""

    def __init__(self, strategy: str, max_failures: int, error: type[Exception]) -> None:
        self.strategy, self.max_failures, self.error = strategy, max_failures, error
        self.unstarted = self.failures = 0

    def before_start(self, e: Exception) -> None:
        self.unstarted += 1
        if self.unstarted > START_RETRIES:
            raise self.error(f"{self.strategy}: actors died before they started, {self.unstarted} "
                             f"times ({type(e).__name__})") from e

    def while_training(self, e: Exception) -> None:
        self.failures += 1
        if self.failures > self.max_failures:
            raise self.error(f"{self.strategy}: an actor died ({type(e).__name__}) and "
                             f"max_failures={self.max_failures} restarts are used up") from e


def fit_restarting(spec: RunSpec, data: Dataset, report: Report, *,
                   start: Callable[[dict[str, Any] | None], Group],
                   finished: Callable[[dict[str, Any]], StateDict],
                   lost: Callable[[BaseException], bool], error: type[Exception]) -> RunResult:
    """Run to spec.epochs from spec.out's checkpoint (an earlier invocation's too). `start`
    makes the actors from a checkpoint (None: from the beginning) and kills them if they fail
    to start; `finished` gives the model of a checkpoint already at spec.epochs; `lost` tells an
    actor's death from any other error. Deaths restart at most spec.max_failures times."""
    restarts = Restarts(spec.strategy, spec.max_failures, error)
    died = ""
    while True:
        saved = checkpoint.resume(spec)
        history = saved["history"] if saved else []
        if died:
            announce(restart_line(restarts.failures, spec.max_failures, died, len(history) + 1))
        if len(history) == spec.epochs:
            return RunResult(history, finished(saved))
        try:
            group = start(saved)
        except Exception as e:
            if not lost(e):
                raise
            restarts.before_start(e)
            announce(f"restart: {spec.strategy} actors died before they started "
                     f"({type(e).__name__}); starting them again ({restarts.unstarted}/"
                     f"{START_RETRIES})")
            died = ""
            continue
        try:
            history = fit(spec, data, group, report, history)
            return RunResult(history, group.state_dict())
        except Exception as e:
            if not lost(e):
                raise
            restarts.while_training(e)
            died = group.who_died(e)
        finally:
            group.close()

