"""`ray job submit` against a real Ray head that this test starts: a private RAY_TMPDIR, free
ports, token authentication with a private token file. The real CLI submits jobs/train.py; a
submission without the token is refused. The test stops only its own head, by the PIDs of
its processes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from rayprocs import AUTH_VARS, RAY, running_head

from raydist.config import RunSpec
from raydist.data import load_data
from raydist.models import build_model

REPO = Path(__file__).resolve().parents[1]
JOB_ARGS = ["--strategy", "ddp", "--workers", "2", "--epochs", "2", "--hidden", "16"]

# a head of its own: one head start, one 2-worker job, two CLI calls
pytestmark = [pytest.mark.multinode, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def head():
    """A head with 2 CPUs; yields the dashboard address and the environment of a client that
    holds the token."""
    with running_head("--num-cpus=2", prefix="rdj") as h:
        yield h.dashboard_url, h.env, h.tmp


def submit(address: str, env: dict[str, str], *entrypoint: str,
           timeout: float) -> subprocess.CompletedProcess:
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--", *entrypoint]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_ddp_job_runs_on_the_head(head, tmp_path):
    address, env, _ = head
    out = tmp_path / "job"
    done = submit(address, env, "python", "jobs/train.py", *JOB_ARGS, "--out", str(out),
                  timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "succeeded" in log and "epoch 2  train_loss" in log
    assert list(pd.read_csv(out / "metrics.csv")["epoch"]) == [1, 2]
    spec = RunSpec.from_dict({"hidden": [16], "out": str(out)})
    expected = build_model(spec, load_data(spec)).state_dict()
    assert list(torch.load(out / "model.pt")) == list(expected)


def test_submission_without_token_is_refused(head, tmp_path):
    address, env, _ = head
    anonymous = {k: v for k, v in env.items() if k not in AUTH_VARS}
    anonymous["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    done = submit(address, anonymous, "python", "-c", "print('should not run')", timeout=120)
    log = done.stdout + done.stderr
    assert done.returncode != 0
    assert "authentication" in log.lower() and "should not run" not in log


def test_a_users_own_model_runs_as_a_job(head, tmp_path):
    """The example project's model and data by import path, shipped with `--working-dir .`:
    imported by the job's driver and by each ddp worker on the cluster."""
    address, env, _ = head
    out = tmp_path / "own"
    own = ["--model", "examples.resmlp.resmlp:make_model", "--data", "examples.resmlp.resmlp:load",
           "--model-arg", "depth=2", "--strategy", "ddp", "--workers", "2", "--epochs", "1"]
    done = submit(address, env, "python", "jobs/train.py", *own, "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(torch.load(out / "model.pt"))[:2] == ["inp.0.weight", "inp.0.bias"]
