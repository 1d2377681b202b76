"""Learning-rate schedules and weak scaling on Ray: with warmup and cosine, ddp on 2 workers,
ps sync and pipeline on 2 stages end where local ends; a ps or pipeline run that loses an actor
mid-warmup resumes its schedule from the checkpoint bit for bit; async ps steps its servers'
schedules once per update; and a weak-scaling sweep (ddp on 1 and 2 workers) reports both
speedups, consistent with its results.csv."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from raydist import report, sweep
from raydist.config import RunSpec
from raydist.data import load_data
from raydist.engine import checkpoint, global_batches
from raydist.runtime import faults
from raydist.train import train

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

# 1617 training samples: 26 steps per epoch (the last of 17), 52 in all; warmup outlasts epoch 1
BASE = {"model": "mlp", "data": "digits", "hidden": [16], "epochs": 2, "batch_size": 64, "seed": 0,
        "val_fraction": 0.1, "optimizer": "adam", "warmup_steps": 30, "lr_schedule": "cosine"}
STRATEGIES = {"ddp": {"workers": 2}, "ps": {"workers": 2, "servers": 2}, "pipeline": {"stages": 2}}


def quiet(rec):
    pass


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    """name -> (spec, result): local and each strategy under the same schedule."""
    root = tmp_path_factory.mktemp("sched")
    done = {}
    for name, extra in {"local": {}, **STRATEGIES}.items():
        spec = RunSpec.from_dict({**BASE, "strategy": name, **extra, "out": str(root / name)})
        done[name] = (spec, train(spec, quiet))
    return done


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_scheduled_run_ends_where_local_ends(runs, name):
    (_, local), (_, result) = runs["local"], runs[name]
    assert list(result.state_dict) == list(local.state_dict)
    diff = max((result.state_dict[k] - local.state_dict[k]).abs().max().item() for k in local.state_dict)
    assert diff <= 1e-5, diff
    for mine, ref in zip(result.metrics, local.metrics, strict=True):
        assert mine["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
        assert (mine["global_batch"], mine["effective_lr"]) == (64, 0.01)


@pytest.mark.parametrize("name", ["ps", "pipeline"])
def test_a_restart_mid_warmup_resumes_the_schedule_bit_for_bit(runs, name, tmp_path, monkeypatch):
    """Replica or stage 1 dies in epoch 2 (step 26 of a 30-step warmup); the new actors start
    from epoch 1's checkpoint, schedule state included, and end on the uninterrupted model."""
    spec, _ = runs[name]
    saved = checkpoint.read(spec.out)
    states = [saved["scheduler"]] if name == "ps" else [st["scheduler"] for st in saved["stages"]]
    assert all(st["last_epoch"] == 52 for st in states)  # one schedule step per optimizer step
    monkeypatch.setenv("RAYDIST_FAULT", "1:2")
    reported = []
    train(spec.replace(out=str(tmp_path), max_failures=1), reported.append)
    assert (tmp_path / faults.MARKER).exists()
    assert [r["epoch"] for r in reported] == [1, 2]
    assert (tmp_path / "model.pt").read_bytes() == (Path(spec.out) / "model.pt").read_bytes()


def test_async_servers_step_their_schedule_once_per_update(runs, tmp_path):
    spec, _ = runs["ps"]
    result = train(spec.replace(mode="async", out=str(tmp_path)), quiet)
    assert result.metrics[-1]["val_accuracy"] > 0.5
    batches = global_batches(spec, load_data(spec), 1)
    # 2 replicas: every batch gives 2 updates, the last one's 17 samples too (9 + 8)
    assert len(batches) == 26 and len(batches[-1]) == 17
    assert checkpoint.read(str(tmp_path))["scheduler"]["last_epoch"] == 2 * 26 * 2


WEAK = """
model: mlp
data: digits
hidden: [16]
epochs: 2
val_fraction: 0.1
optimizer: adam
strategy: ddp
batch_per_worker: 32
lr_scaling: linear
warmup_steps: 10
workers: {grid: [1, 2]}
sweep: {metric: val_accuracy, target: 0.3, max_concurrent: 1}
"""


def test_weak_scaling_sweep_reports_both_speedups(ray_local, tmp_path):
    (tmp_path / "weak.yaml").write_text(WEAK)
    out = tmp_path / "weak"
    sweep.run(tmp_path / "weak.yaml", out)
    results = pd.read_csv(out / "results.csv")
    assert set(results["status"]) == {"completed"}
    by_n = {n: rows.sort_values("epoch") for n, rows in results.groupby("workers")}
    assert [list(by_n[n]["global_batch"]) for n in (1, 2)] == [[32, 32], [64, 64]]
    assert [by_n[n]["effective_lr"].iloc[0] for n in (1, 2)] == pytest.approx([0.005, 0.01])

    text = report.write(out).read_text()
    assert "Scaling: weak (batch_per_worker: the global batch grows with the replicas)." in text
    lines = text.splitlines()
    assert ("| workers | global_batch | seeds | samples_per_s | speedup | efficiency | vs_local | "
            "time_to_target | ttt_speedup |") in lines
    # by hand from results.csv: throughput = samples/s of epoch 2 (the epochs after the first);
    # time to target = wall time of the first epoch at val_accuracy >= 0.3
    rate = {n: rows.loc[rows["epoch"] == 2, "samples_per_s"].item() for n, rows in by_n.items()}
    ttt = {n: rows.loc[rows["val_accuracy"] >= 0.3, "wall_time_s"].iloc[0] for n, rows in by_n.items()}
    speedup, ttt_speedup = rate[2] / rate[1], ttt[1] / ttt[2]
    assert f"| 1 | 32 | 1 | {rate[1]:.0f} | 1.00 | 1.00 | - | {ttt[1]:.2f} s | 1.00 |" in lines
    assert (f"| 2 | 64 | 1 | {rate[2]:.0f} | {speedup:.2f} | {speedup / 2:.2f} | - | {ttt[2]:.2f} s | "
            f"{ttt_speedup:.2f} |") in lines
    assert math.isfinite(ttt_speedup) and (out / "speedup.png").read_bytes()[:4] == b"\x89PNG"
