"""ddp on Ray Train: the same parameters as local, checkpoints that make a killed worker or a
second run continue where they stopped, and user errors before anything runs."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from raydist import cli
from raydist.config import ConfigError, RunSpec
from raydist.data import load_data
from raydist.engine import Record, RunResult
from raydist.engine.record import documented
from raydist.runtime import faults
from raydist.strategies import ddp
from raydist.train import train

# Each Ray Train fit costs ~10 s on an idle 2-core machine, several times that under load.
pytestmark = pytest.mark.timeout(900)
SIX = ["gd", "sgd", "momentum", "adagrad", "rmsprop", "adam"]
NEW = ["muon", "lamb", "adafactor", "lion", "schedule-free-adamw"]
CHECKED = SIX + NEW
# Small enough that Ray Train's start-up, not the training, is what a test waits for. With 10%
# held out, digits has 1617 training samples: gd's full batch and each epoch's last batch (17)
# split unevenly over 2 workers.
BASE = {"model": "mlp", "data": "digits", "hidden": [16], "epochs": 3, "batch_size": 64,
        "seed": 0, "workers": 2, "val_fraction": 0.1}


def spec(out: Path, **changes: object) -> RunSpec:
    return RunSpec.from_dict({**BASE, "strategy": "ddp", "out": str(out), **changes})


def run_ddp(tmp: Path, optimizer: str) -> tuple[RunResult, list[Record], list[bool]]:
    """One optimizer through `train` with ddp; its records, and whether each reached `report`
    in the thread that called `train`."""
    records, threads = [], []

    def report(rec: Record) -> None:
        records.append(rec)
        threads.append(threading.current_thread().name)

    caller = threading.current_thread().name
    result = train(spec(tmp / f"ddp_{optimizer}", optimizer=optimizer), report=report)
    return result, records, [t == caller for t in threads]


@pytest.fixture(scope="module")
def six_runs(ray_local, tmp_path_factory, trained):
    """local and ddp for the six optimizers and the five newer ones. The local runs go one by
    one: they draw their weights from torch's global RNG, which threads share. The ddp runs
    (weights drawn in the worker processes) go two at a time: a fit mostly waits on Ray Train's
    start-up and shutdown, and 2 x 2 workers fit the fixture's 4 CPUs. The ddp runs are kept for later
    modules (tests/test_multinode.py compares a run that lost a node with the adam one)."""
    tmp = tmp_path_factory.mktemp("six")
    local = {opt: train(spec(tmp / f"local_{opt}", strategy="local", workers=1, optimizer=opt),
                        report=lambda rec: None) for opt in CHECKED}
    with ThreadPoolExecutor(2) as pool:
        ddp_runs = dict(zip(CHECKED, pool.map(lambda opt: run_ddp(tmp, opt), CHECKED), strict=True))
    for opt in CHECKED:
        trained.put(spec(tmp / f"ddp_{opt}", optimizer=opt), ddp_runs[opt][0])
    return tmp, {opt: (local[opt], *ddp_runs[opt]) for opt in CHECKED}


@pytest.mark.ray
@pytest.mark.parametrize("optimizer", CHECKED)
def test_ddp_matches_local(six_runs, optimizer):
    tmp, runs = six_runs
    local, result, records, in_caller = runs[optimizer]
    assert list(result.state_dict) == list(local.state_dict)
    diff = max((result.state_dict[k] - local.state_dict[k]).abs().max().item()
               for k in local.state_dict)
    assert diff <= 1e-5
    assert [r["epoch"] for r in records] == [1, 2, 3] and all(in_caller)
    for mine, ref in zip(result.metrics, local.metrics, strict=True):
        assert mine["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
        assert abs(mine["val_accuracy"] - ref["val_accuracy"]) <= 0.005
        assert mine["world_size"] == 2 and all(documented(k) for k in mine)
    out = tmp / f"ddp_{optimizer}"
    saved = torch.load(out / "model.pt")
    assert list(saved) == list(local.state_dict)
    assert all(torch.equal(saved[k], result.state_dict[k]) for k in saved)
    assert list(pd.read_csv(out / "metrics.csv")["epoch"]) == [1, 2, 3]
    assert yaml.safe_load((out / "spec.yaml").read_text())["strategy"] == "ddp"


@pytest.mark.ray
def test_killed_worker_resumes_bit_for_bit(six_runs, monkeypatch):
    """Worker 1 dies in epoch 2 of the first attempt; Ray Train restarts the group from the
    latest checkpoint, and the model equals the uninterrupted run's exactly."""
    tmp, runs = six_runs
    monkeypatch.setenv("RAYDIST_FAULT", "1:2")
    out = tmp / "fault"
    records = []
    result = train(spec(out, optimizer="adam", max_failures=1), report=records.append)
    assert (out / faults.MARKER).exists()  # the fault really fired
    assert [r["epoch"] for r in records] == [1, 2, 3]
    reference = runs["adam"][1].state_dict
    assert all(torch.equal(result.state_dict[k], reference[k]) for k in reference)


@pytest.mark.ray
def test_second_run_continues_from_the_first(six_runs):
    """A finished 3-epoch run (a copy of the adam one) run again with 4 epochs: epochs 1-3 come
    from its checkpoint (their timings too, so they were not trained again) and epoch 4 is
    trained from the restored model and optimizer state, so it still matches local."""
    tmp, runs = six_runs
    out = tmp / "resume"
    shutil.copytree(tmp / "ddp_adam", out)
    records = []
    result = train(spec(out, optimizer="adam", epochs=4), report=records.append)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert result.metrics[:3] == runs["adam"][1].metrics
    local = train(spec(tmp / "local_adam_4", strategy="local", workers=1, optimizer="adam",
                       epochs=4),
                  report=lambda rec: None)
    assert max((result.state_dict[k] - local.state_dict[k]).abs().max().item()
               for k in local.state_dict) <= 1e-5
    with pytest.raises(ConfigError, match=r"^optimizer: got 'sgd', but .* holds a ddp run with "
                       r"optimizer='adam'"):
        train(spec(out, optimizer="sgd", epochs=5))


class Interrupt(Exception):
    pass


@pytest.mark.ray
def test_failing_report_stops_the_run(ray_local, tmp_path):
    """An exception from `report` (Tune stopping a trial, Ctrl-C) reaches the caller, and the
    workers are told to stop: no training thread outlives the call."""

    def report(rec: Record) -> None:
        raise Interrupt

    with pytest.raises(Interrupt):
        train(spec(tmp_path / "stop", optimizer="sgd", epochs=1000), report=report)
    assert not [t for t in threading.enumerate() if t.name == "ddp-fit"]
    assert not (tmp_path / "stop" / "model.pt").exists()


# A diverging ddp run (Diverged raised in the caller, no restart spent on it) is checked by
# tests/test_sweep.py::test_ddp_divergence_raises_in_the_caller: that sweep's 2-worker ddp trial
# diverges, so the check shares its Ray Train fit instead of paying for one of its own.


@pytest.mark.ray
def test_too_many_workers_fails_fast(ray_local, tmp_path, capsys):
    out = tmp_path / "big"
    code = cli.main(["train", "--strategy", "ddp", "--workers", "64", "--out", str(out)])
    cpus = int(ray_local.cluster_resources()["CPU"])
    assert code == 2
    assert capsys.readouterr().err == ("error: ddp with 64 workers needs 64 CPUs but the cluster "
                                       f"can provide at most {cpus}\n")
    assert not out.exists()


@pytest.mark.unit
def test_global_batch_must_divide_by_workers(tmp_path):
    s = spec(tmp_path, workers=3)
    with pytest.raises(ConfigError) as e:
        ddp.check(s, load_data(s))
    assert str(e.value) == ("batch_size: got 64; the global batch must divide by workers (3), "
                            "e.g. 63")


@pytest.mark.unit
def test_gd_is_not_bound_by_batch_size(tmp_path):
    """gd takes the whole training set as one batch and splits it as evenly as it can."""
    s = spec(tmp_path, workers=3, optimizer="gd")
    ddp.check(s, load_data(s))
