"""tp on Ray Train: 2 workers splitting mlp and gpt, and 2 x 2 (two tensor-parallel groups of
2, data parallel across them) end where local does; a killed worker's group resumes from the
checkpoints and ends exactly where the uninterrupted run does; each worker holds its share of
the model (the record's memory fields). tests/test_tp_plan.py checks the recipes without Ray."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from raydist.config import ConfigError, RunSpec
from raydist.engine import RunResult
from raydist.engine.record import documented
from raydist.runtime import faults
from raydist.strategies import tp
from raydist.train import train

# Each Ray Train fit costs ~10 s on an idle 2-core machine, several times that under load.
pytestmark = pytest.mark.timeout(1200)
TOL = 1e-5
# fc0 and fc1 a pair, fc2 and head another
MLP = {"model": "mlp", "data": "digits", "hidden": [32, 16, 8], "optimizer": "adam", "epochs": 2,
       "batch_size": 64, "seed": 0}
# momentum, not adam: the attention key bias's gradient is zero but for round-off, which adam
# scales up to full steps (tests/test_pipeline.py); a tied head: one tensor, replicated
GPT = {"model": "gpt", "data": "text", "layers": 2, "d_model": 32, "heads": 4, "seq_len": 16,
       "text_chars": 5000, "tie_head": True, "optimizer": "momentum", "lr": 0.05, "epochs": 1,
       "batch_size": 32, "seed": 0}
RUNS = {
    "mlp": (MLP, {"workers": 2}),
    "gpt": (GPT, {"workers": 2}),
    "mlp 2x2": ({**MLP, "epochs": 1}, {"workers": 4, "tp_size": 2}),
}


def run(raw: dict, out: Path) -> RunResult:
    return train(RunSpec.from_dict({**raw, "out": str(out)}), lambda rec: None)


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory) -> dict[str, tuple[RunResult, RunResult, Path]]:
    """local and tp of each case, one after the other (two fits at once overloaded a shared
    2-core machine past Ray's call timeouts)."""
    tmp = tmp_path_factory.mktemp("tp")
    out = {}
    for name, (raw, changes) in RUNS.items():
        local = run(raw, tmp / f"local {name}")
        out[name] = (local, run({**raw, "strategy": "tp", **changes}, tmp / name), tmp / name)
    return out


def apart(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.ray
@pytest.mark.parametrize("name", list(RUNS))
def test_tp_equals_local(runs, name):
    local, tp, out = runs[name]
    assert apart(tp.state_dict, local.state_dict) <= TOL
    saved = torch.load(out / "model.pt", weights_only=True)  # local's keys and layout
    assert list(saved) == list(local.state_dict)
    assert all(torch.equal(saved[k], tp.state_dict[k]) for k in saved)
    world = RUNS[name][1]["workers"]
    for mine, ref in zip(tp.metrics, local.metrics, strict=True):
        assert mine["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)  # each group once
        assert mine["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5)
        assert mine["world_size"] == world and all(documented(k) for k in mine)
    assert list(pd.read_csv(out / "metrics.csv")["epoch"]) == [r["epoch"] for r in local.metrics]


@pytest.mark.ray
def test_the_command_on_the_machines_own_ray(runs, tmp_path):
    """What a user types, in a fresh process with its own embedded Ray (this machine's CPU
    count, not the session's): 2 tp workers on the mlp end where local does."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = ["--model", "mlp", "--data", "digits", "--hidden", "32,16,8", "--optimizer", "adam",
            "--epochs", "2", "--batch-size", "64", "--seed", "0", "--strategy", "tp", "--workers", "2"]
    done = subprocess.run([sys.executable, "-m", "raydist.cli", "train", *args, "--out",
                           str(tmp_path / "cli")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    local = runs["mlp"][0].state_dict
    assert apart(torch.load(tmp_path / "cli" / "model.pt", weights_only=True), local) <= TOL


@pytest.mark.ray
def test_a_tied_head_stays_tied(runs):
    saved = torch.load(runs["gpt"][2] / "model.pt", weights_only=True)
    assert torch.equal(saved["head.1.weight"], saved["embed.tok.weight"])


@pytest.mark.ray
def test_each_worker_holds_its_share_of_the_model(runs):
    """mlp 64-32-16-8-10 under adam: per rank the column-split fc0 (64x32 + 32) and fc2 (16x8 +
    8) hold half their rows, the row-split fc1 (32x16) and head (8x10) half their columns and
    their whole biases (16, 10): 1430 of 2834 parameters, each with its gradient and adam's two
    moments in float32, plus adam's 8 step counters (4 bytes each). ddp's worker holds all
    2834 (45376 bytes)."""
    _, tp, _ = runs["mlp"]
    for rec in tp.metrics:
        assert rec["model_state_bytes"] == 4 * 4 * 1430 + 8 * 4 < 4 * 4 * 2834 + 8 * 4
        assert [w["worker"] for w in rec["per_worker_memory"]] == ["rank 0", "rank 1"]
        assert {w["model_state_bytes"] for w in rec["per_worker_memory"]} == {rec["model_state_bytes"]}


@pytest.mark.ray
def test_a_killed_worker_resumes_bit_for_bit(runs, monkeypatch, tmp_path):
    """Worker 1 dies in epoch 2; Ray Train restarts the group, each rank reloads its own
    shards of epoch 1's checkpoint, and the model equals the uninterrupted run's exactly."""
    monkeypatch.setenv("RAYDIST_FAULT", "1:2")
    out = tmp_path / "fault"
    records = []
    raw, changes = RUNS["mlp"]
    result = train(RunSpec.from_dict({**raw, "strategy": "tp", **changes, "max_failures": 1,
                                      "out": str(out)}), records.append)
    assert (out / faults.MARKER).exists()  # the fault really fired
    assert [r["epoch"] for r in records] == [1, 2]
    reference = runs["mlp"][1].state_dict
    assert all(torch.equal(result.state_dict[k], reference[k]) for k in reference)


@pytest.mark.ray
def test_a_second_run_continues_from_the_first(runs, tmp_path):
    """The finished 2-epoch mlp run (a copy) run again with 3 epochs: epochs 1-2 come from its
    checkpoints (their records as they were), epoch 3 is trained from every rank's restored
    shards and optimizer state, and the model still equals local's."""
    out = tmp_path / "resume"
    shutil.copytree(runs["mlp"][2], out)
    raw, changes = RUNS["mlp"]
    records = []
    result = train(RunSpec.from_dict({**raw, "strategy": "tp", **changes, "epochs": 3,
                                      "out": str(out)}), records.append)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert result.metrics[:2] == runs["mlp"][1].metrics
    local = run({**raw, "epochs": 3}, tmp_path / "local")
    assert apart(result.state_dict, local.state_dict) <= TOL


@pytest.mark.unit
def test_a_tampered_rank_file_is_refused_before_ray_starts(tmp_path):
    """Each rank restores its own file inside Ray Train: every one is checked in the pre-flight."""
    folder = tmp_path / "ray" / "tp" / "checkpoint_1"
    folder.mkdir(parents=True)
    torch.save({"history": []}, folder / "rank0.pt")
    torch.save({"history": [], "evil": RunSpec}, folder / "rank1.pt")  # a class: code to unpickle
    with pytest.raises(ConfigError, match=r"rank1\.pt: not a raydist checkpoint \(refused to unpickle"):
        tp.check_saved(RunSpec.from_dict({"strategy": "tp", "workers": 2, "out": str(tmp_path)}))
