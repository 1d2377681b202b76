"""Kills from outside: while a run trains, a background thread SIGKILLs a randomly chosen process of
its actors (ddp's and fsdp's Ray Train workers, ps servers and replicas, pipeline stages) twice, at random
moments drawn from a seeded RNG (tests/killer.py). A sync run still ends with the very model an
uninterrupted run ends with (torch.equal on every tensor); async ps completes with finite losses.

Each run's epochs are made long enough (small batches: ~100-200 steps) for the kills to land
while it trains."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
import torch
from killer import Killer

from raydist.config import RunSpec
from raydist.train import train

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]
BASE = {"model": "mlp", "data": "digits", "hidden": [16], "epochs": 6, "seed": 0, "val_fraction": 0.1,
        "optimizer": "adam"}
KILLS = 2
RUNS = {  # name: (fields, actors per attempt)
    "ddp": ({"strategy": "ddp", "workers": 2, "batch_size": 8}, 2),
    "fsdp": ({"strategy": "fsdp", "workers": 2, "batch_size": 8}, 2),
    "ps-sync": ({"strategy": "ps", "workers": 2, "servers": 1, "batch_size": 16}, 3),
    "ps-async": ({"strategy": "ps", "workers": 2, "servers": 1, "batch_size": 16, "mode": "async"}, 3),
    "pipeline": ({"strategy": "pipeline", "stages": 2, "batch_size": 32, "microbatches": 4}, 2),
}


def spec(tmp_path, name: str, **changes: object) -> RunSpec:
    return RunSpec.from_dict({**BASE, **RUNS[name][0], "out": str(tmp_path / name), **changes})


def killed_run(tmp_path, name: str, seed: int) -> tuple[dict[str, torch.Tensor], list, Killer]:
    """The run with KILLS kills; max_failures leaves room for one kill more (a kill may land
    while the previous one's restart is still starting: a start failure of its own)."""
    s = spec(tmp_path / "killed", name, max_failures=KILLS + 1)
    records = []
    with Killer(s.strategy, RUNS[name][1], kills=KILLS, seed=seed) as killer:
        train(s, records.append)
    return torch.load(tmp_path / "killed" / name / "model.pt"), records, killer


SYNC = ["ddp", "fsdp", "ps-sync", "pipeline"]


@pytest.fixture(scope="module")
def clean(ray_local, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """The uninterrupted runs, before any Killer runs. ddp's and fsdp's at once (2 + 2 Ray Train
    workers fit the session's 4 CPUs), as test_ddp's fits go: a fit mostly waits on its
    processes' start-up. ps and the pipeline after them, one by one: they may draw weights from
    torch's global RNG in this process, which threads share."""
    tmp = tmp_path_factory.mktemp("clean")

    def run(name: str) -> dict[str, torch.Tensor]:
        return train(spec(tmp, name), lambda rec: None).state_dict

    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(["ddp", "fsdp"], pool.map(run, ["ddp", "fsdp"]), strict=True))
    return {**done, "ps-sync": run("ps-sync"), "pipeline": run("pipeline")}


@pytest.mark.parametrize("name", SYNC)
def test_a_sync_run_killed_twice_ends_with_the_uninterrupted_model(clean, tmp_path, name):
    clean = clean[name]
    model, records, killer = killed_run(tmp_path, name, seed=len(name))
    assert len(killer.killed) == KILLS, f"the runs ended before {KILLS} kills: {killer.killed}"
    assert list(model) == list(clean)
    assert [k for k in clean if not torch.equal(clean[k], model[k])] == []
    metrics = pd.read_csv(tmp_path / "killed" / name / "metrics.csv")
    assert metrics["epoch"].tolist() == list(range(1, BASE["epochs"] + 1))


def test_async_ps_killed_twice_completes_with_finite_losses(ray_local, tmp_path):
    _, records, killer = killed_run(tmp_path, "ps-async", seed=7)
    assert len(killer.killed) == KILLS, f"the run ended before {KILLS} kills: {killer.killed}"
    metrics = pd.read_csv(tmp_path / "killed" / "ps-async" / "metrics.csv")
    assert metrics["epoch"].tolist() == list(range(1, BASE["epochs"] + 1))
    assert all(math.isfinite(x) for x in metrics["train_loss"].tolist() + metrics["val_loss"].tolist())
    assert metrics["val_accuracy"].iloc[-1] > 0.8  # it learned: 10 classes, chance is 0.1
