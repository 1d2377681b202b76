"""A trial under Population Based Training: a `local` run (it trains inside the Tune trial's
own process) whose every epoch is reported to Tune with a checkpoint, and which starts from the
checkpoint Tune hands it: its own after a pause, a donor's after PBT cloned that one into it.

The checkpoint (STATE in Tune's checkpoint folder; plain data, loaded with weights_only=True)
holds the model, the optimizer's and the lr schedule's state, the epochs so far with who trained
each, and the id of the trial that wrote it. Restored into this trial's config, the optimizer's
param groups take the config's lr (as the schedule's base, after lr_scaling, at the step the
donor reached) and weight_decay (config/search.PERTURBABLE): PBT's perturbed values apply from
the next epoch on.

In the trial's folder: epochs.csv (each epoch with `trained_by`, the trial whose run trained it,
and the perturbed fields' values in that epoch) and exploits.csv (each clone: the epoch it
started after, the donor, the new values), read into results.csv by `lineage`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from ray import tune
from torch.optim.lr_scheduler import LambdaLR

from raydist import strategies
from raydist.config import RunSpec
from raydist.config.search_rules import PERTURBABLE
from raydist.data import load_data
from raydist.engine import (
    Diverged,
    Record,
    RunResult,
    checkpoint,
    claim,
    effective_lr,
    fit,
    preflight,
    save_metrics,
    save_outputs,
)
from raydist.engine.record import scalars

STATE, EPOCHS, EXPLOITS = "state.pt", "epochs.csv", "exploits.csv"


def train(spec: RunSpec, out: Path) -> RunResult:
    """Pre-flight, claim, restore from Tune's checkpoint if any, fit, save: raydist.train's
    path for local, with the epochs reported to Tune by the trainer below."""
    local = strategies.get("local")
    preflight(spec, local)
    claim(spec)
    torch.set_num_threads(spec.threads_per_worker)
    data = load_data(spec)
    trainer = Cloned(local.Local(spec, data), spec, out)
    try:
        history = fit(spec, data, trainer, trainer.report, trainer.restore())
    except Diverged as e:
        save_metrics(out, e.history)
        raise
    result = RunResult(history, trainer.local.model.state_dict())
    save_outputs(out, spec, result)
    return result


class Cloned:
    """local's Trainer, whose checkpoint goes to Tune with the epoch's report."""

    def __init__(self, local: Any, spec: RunSpec, out: Path) -> None:
        self.local, self.spec, self.out = local, spec, out
        self.me = tune.get_context().get_trial_id()
        self.rows: list[dict[str, Any]] = []
        self.saved = 0

    def train_epoch(self, epoch: int, batches: list[torch.Tensor]) -> tuple[float, Record]:
        return self.local.train_epoch(epoch, batches)

    def evaluate(self) -> Record:
        return self.local.evaluate()

    def save(self, history: list[Record]) -> None:
        self.saved = history[-1]["epoch"]  # the next report carries the checkpoint

    def restore(self) -> list[Record]:
        """The epochs of Tune's checkpoint (none at the start), its model and optimizer state,
        with this trial's lr and weight_decay; a donor's checkpoint is logged as an exploit."""
        saved = tune.get_checkpoint()
        if saved is None:
            return []
        with saved.as_directory() as folder:
            state = torch.load(Path(folder) / STATE, map_location="cpu", weights_only=True)
        self.local.model.load_state_dict(state["model"])
        self.local.optimizer.load_state_dict(state["optimizer"])  # brings the donor's lr back
        self.local.scheduler.load_state_dict(state["scheduler"])  # the donor's step in the schedule
        take_config(self.local.scheduler, self.spec)
        self.rows = state["rows"]
        if state["trial_id"] != self.me:
            log_exploit(self.out, len(self.rows), state["trial_id"], self.spec)
        return [{k: v for k, v in row.items() if k not in LINEAGE} for row in self.rows]

    def report(self, rec: Record) -> None:
        rec = scalars(rec)  # the workers' own memory stays out of Tune and epochs.csv
        self.rows.append({**rec, "trained_by": self.me,
                          **{name: getattr(self.spec, name) for name in PERTURBABLE}})
        pd.DataFrame(self.rows).to_csv(self.out / EPOCHS, index=False)
        if self.saved != rec["epoch"]:  # a diverged epoch is reported, never checkpointed
            tune.report(dict(rec))
            return
        with tempfile.TemporaryDirectory() as folder:
            checkpoint.save(Path(folder) / STATE, {
                "model": self.local.model.state_dict(), "optimizer": self.local.optimizer.state_dict(),
                "scheduler": self.local.scheduler.state_dict(), "rows": self.rows, "trial_id": self.me})
            tune.report(dict(rec), checkpoint=tune.Checkpoint.from_directory(folder))


def take_config(scheduler: LambdaLR, spec: RunSpec) -> None:
    """This trial's lr and weight_decay in every param group: the lr as the schedule's base (the
    lr after lr_scaling), at the step the schedule has reached; then it goes on from there."""
    base = effective_lr(spec)
    scheduler.base_lrs = [base] * len(scheduler.base_lrs)
    for group, at in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group.update({"initial_lr": base, "lr": base * at(scheduler.last_epoch),
                      **{name: getattr(spec, name) for name in PERTURBABLE if name != "lr"}})


LINEAGE = ("trained_by", *PERTURBABLE)
"""What epochs.csv adds to each epoch's record under PBT."""


def log_exploit(out: Path, epoch: int, donor: str, spec: RunSpec) -> None:
    path = out / EXPLOITS
    log = pd.read_csv(path) if path.exists() else pd.DataFrame()
    row = {"after_epoch": epoch, "donor": donor, **{n: getattr(spec, n) for n in PERTURBABLE}}
    if len(log) and (log.iloc[-1]["after_epoch"], log.iloc[-1]["donor"]) == (epoch, donor):
        return  # the same clone, started again (paused before its first epoch)
    pd.concat([log, pd.DataFrame([row])], ignore_index=True).to_csv(path, index=False)


def lineage(out: Path) -> dict[str, Any]:
    """results.csv's columns of a PBT trial: `exploits` (how often it cloned another trial) and
    `cloned_from` (the donors in order, comma-separated); nothing for a trial of another sweep."""
    path = out / EXPLOITS
    if not (out / EPOCHS).exists() or "trained_by" not in pd.read_csv(out / EPOCHS, nrows=0):
        return {}
    donors = pd.read_csv(path)["donor"].tolist() if path.exists() else []
    return {"exploits": len(donors), "cloned_from": ",".join(donors)}
