"""Experiment tracking: `tracking: tensorboard` or `tracking: mlflow` (default: none).

A single run logs each epoch's record from the one place records pass, `raydist.train`'s
tee: tensorboard, event files in OUT/tensorboard/ (tensorboardX's SummaryWriter, one scalar per
record field, step = epoch); mlflow, one MLflow run with the spec as params and every numeric
record field as a metric at step = epoch.

A sweep tracks its trials with Ray Tune's own callbacks, on the sweep's driver (its trials do
not track themselves): tensorboard, Tune's TBXLoggerCallback (event files in each trial's Tune
folder, DIR/tune/<trial>/, tags `ray/tune/<field>`); mlflow, `ray.air.integrations.mlflow`'s
MLflowLoggerCallback (one MLflow run per trial, named after it, in the experiment named after
DIR). `raydist report DIR` then logs the report's page and plots as artifacts of a run named
`report` in that experiment.

MLflow's store is MLFLOW_TRACKING_URI when set, else a folder `mlruns/` inside the run's (the
sweep's) output folder. MLflow 3 refuses a folder store unless MLFLOW_ALLOW_FILE_STORE is true;
raydist sets it for that folder (a database or server store needs nothing).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from raydist.registry import Registry

if TYPE_CHECKING:  # annotations only: config sits above this layer and imports it
    from raydist.config import RunSpec

Record = dict[str, Any]
EXPERIMENT = "raydist"
"""The MLflow experiment of single runs (MLFLOW_EXPERIMENT_NAME overrides it)."""


class Tracker(Protocol):
    def log(self, rec: Record) -> None:
        """One epoch's record."""

    def close(self, failed: bool = False) -> None:
        """The run ended (failed: it raised)."""


@dataclass(frozen=True)
class TrackingEntry:
    run: Callable[[RunSpec], Tracker]
    """the tracker of a single run"""
    tune: Callable[[Path], list[Any]]
    """Ray Tune callbacks that track a sweep's trials, given the sweep's folder"""
    report: Callable[[Path, list[Path]], None] | None = None
    """log a sweep report's files (its page and plots)"""


TRACKERS: Registry[TrackingEntry] = Registry("tracking")


def numbers(rec: Record) -> dict[str, float]:
    """The record's numeric fields but the step itself (epoch)."""
    return {k: float(v) for k, v in rec.items()
            if k != "epoch" and isinstance(v, int | float) and not isinstance(v, bool)}


# --- TensorBoard ---------------------------------------------------------------------------------

class TensorBoard:
    def __init__(self, spec: RunSpec) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(Path(spec.out) / "tensorboard"))

    def log(self, rec: Record) -> None:
        for key, value in numbers(rec).items():
            self.writer.add_scalar(key, value, global_step=rec["epoch"])
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def tune_tensorboard(root: Path) -> list[Any]:
    from ray.tune.logger import TBXLoggerCallback

    return [TBXLoggerCallback()]  # Tune adds one by default too; explicit, whatever the env says


# --- MLflow --------------------------------------------------------------------------------------

def mlflow_uri(folder: str | Path) -> str:
    """MLFLOW_TRACKING_URI, else the folder store `mlruns/` inside `folder`."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses folders otherwise
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO lines between the epoch lines
    return (Path(folder) / "mlruns").resolve().as_uri()


def experiment_id(client: Any, name: str) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)


class MLflow:
    def __init__(self, spec: RunSpec) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(mlflow_uri(spec.out))
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        run = self.client.create_run(experiment_id(self.client, name), run_name=Path(spec.out).name)
        self.run_id = run.info.run_id
        params = [Param(f.name, str(getattr(spec, f.name))) for f in fields(spec)]
        self.client.log_batch(self.run_id, params=params)

    def log(self, rec: Record) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, rec["epoch"]) for k, v in numbers(rec).items() if math.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def tune_mlflow(root: Path) -> list[Any]:
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(tracking_uri=mlflow_uri(root), experiment_name=root.name)]


def report_mlflow(root: Path, files: list[Path]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri(root))
    run = client.create_run(experiment_id(client, root.name), run_name="report")
    for path in files:
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)


TRACKERS.register("tensorboard")(TrackingEntry(TensorBoard, tune_tensorboard))
TRACKERS.register("mlflow")(TrackingEntry(MLflow, tune_mlflow, report_mlflow))


# --- what the callers use ------------------------------------------------------------------------

class Untracked:
    def log(self, rec: Record) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


def open_run(spec: RunSpec | None) -> Tracker:
    """The tracker of one run; one that does nothing without a spec or for tracking: none."""
    return TRACKERS[spec.tracking].run(spec) if spec is not None and spec.tracking else Untracked()


def tune_callbacks(name: str | None, root: Path) -> list[Any]:
    return TRACKERS[name].tune(root) if name else []


def log_report(name: str | None, root: Path, files: list[Path]) -> None:
    entry = TRACKERS[name] if name else None
    if entry is not None and entry.report is not None:
        entry.report(root, files)
