"""Tracking, read back with the trackers' own readers: TensorBoard's EventAccumulator and
MLflow's client hold what metrics.csv (a run) and epochs.csv (each sweep trial) hold."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from raydist import report, sweep
from raydist.cli import main

FIELDS = ["train_loss", "val_loss", "val_accuracy", "samples_per_s", "epoch_time_s", "wall_time_s",
          "global_batch", "effective_lr", "grad_norm", "grad_norm_max", "model_state_bytes",
          "optimizer_state_bytes", "peak_rss_bytes"]
RUN = ["train", "--strategy", "local", "--data", "digits", "--epochs", "3", "--batch-size", "128"]


def scalars(folder: Path, prefix: str = "") -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files in `folder`: [(step, value), ...]."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag.removeprefix(prefix): [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"] if tag.startswith(prefix)}


def columns(metrics: pd.DataFrame) -> dict[str, list[tuple[int, float]]]:
    return {f: list(zip(metrics["epoch"].tolist(), metrics[f].tolist(), strict=True)) for f in FIELDS}


def approx(table: dict[str, list[tuple[int, float]]]) -> dict:
    """Event files hold float32: equal to the CSV to float32 precision."""
    return {k: [(s, pytest.approx(v, rel=1e-6)) for s, v in rows] for k, rows in table.items()}


def history(client: MlflowClient, run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


@pytest.mark.unit
def test_a_run_writes_tensorboard_events_equal_to_metrics_csv(tmp_path):
    out = tmp_path / "run"
    assert main([*RUN, "--tracking", "tensorboard", "--out", str(out)]) == 0
    metrics = pd.read_csv(out / "metrics.csv")
    assert scalars(out / "tensorboard") == approx(columns(metrics))


@pytest.mark.unit
def test_a_run_logs_params_and_metrics_to_mlflow(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    assert main([*RUN, "--tracking", "mlflow", "--out", str(out)]) == 0
    client = MlflowClient((out / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("raydist").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert {k: run.data.params[k] for k in ("strategy", "optimizer", "epochs", "batch_size", "tracking")} == {
        "strategy": "local", "optimizer": "adam", "epochs": "3", "batch_size": "128", "tracking": "mlflow"}
    assert history(client, run.info.run_id, FIELDS) == columns(pd.read_csv(out / "metrics.csv"))


@pytest.mark.unit
def test_mlflow_tracking_uri_wins_over_the_folder(tmp_path, monkeypatch):
    store = tmp_path / "elsewhere"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    out = tmp_path / "run"
    assert main([*RUN, "--epochs", "1", "--tracking", "mlflow", "--out", str(out)]) == 0
    assert not (out / "mlruns").exists()
    client = MlflowClient(store.as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("mine").experiment_id])
    assert history(client, run.info.run_id, ["val_loss"]) == {
        "val_loss": [(1, pd.read_csv(out / "metrics.csv")["val_loss"].iloc[0])]}


@pytest.mark.unit
def test_an_unknown_tracker_is_one_error_line(tmp_path, capsys):
    assert main([*RUN, "--tracking", "wandb", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ("error: tracking: unknown value 'wandb'; expected one of "
                                       "tensorboard, mlflow\n")
    assert not (tmp_path / "run").exists()


SWEEP = """
strategy: local
data: digits
epochs: 2
batch_size: 128
tracking: {tracking}
optimizer: {{grid: [sgd, adam]}}
sweep: {{max_concurrent: 2}}
"""


def trial_epochs(out: Path) -> dict[str, pd.DataFrame]:
    return {d.name: pd.read_csv(d / "epochs.csv") for d in sorted((out / "trials").iterdir())}


@pytest.mark.ray
def test_a_sweep_logs_each_trial_to_tensorboard(ray_local, tmp_path):
    (tmp_path / "sweep.yaml").write_text(SWEEP.format(tracking="tensorboard"))
    sweep.run(tmp_path / "sweep.yaml", tmp_path / "out")
    trials = trial_epochs(tmp_path / "out")
    assert len(trials) == 2
    for trial_id, epochs in trials.items():
        (folder,) = [p for p in (tmp_path / "out" / "tune").iterdir() if trial_id in p.name]
        assert approx(columns(epochs)).items() <= scalars(folder, "ray/tune/").items()
        assert not (tmp_path / "out" / "trials" / trial_id / "tensorboard").exists()  # logged once


@pytest.mark.ray
def test_a_sweep_logs_each_trial_and_the_report_to_mlflow(ray_local, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "sweep.yaml").write_text(SWEEP.format(tracking="mlflow"))
    out = tmp_path / "out"
    sweep.run(tmp_path / "sweep.yaml", out)
    report.write(out)
    client = MlflowClient((out / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("out").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    for trial_id, epochs in trial_epochs(out).items():
        (name,) = [n for n in by_name if n.endswith(trial_id)]
        run = by_name[name]
        spec = yaml.safe_load((out / "trials" / trial_id / "spec.yaml").read_text())
        assert run.data.params["variant/optimizer"] == spec["optimizer"]
        assert history(client, run.info.run_id, FIELDS) == columns(epochs)
    artifacts = {a.path for a in client.list_artifacts(by_name["report"].info.run_id)}
    assert artifacts == {"report.md", "report.html", "curves.png", "memory.png"}  # local trials record memory
