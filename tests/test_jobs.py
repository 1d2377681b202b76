"""`ray job submit` against a real Ray head that this test starts: a private RAY_TMPDIR, free
ports, token authentication with a private token file. The real CLI submits jobs/train.py; a
submission without the token is refused. The test stops only its own head, by the PIDs of
its processes."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from raydist.config import RunSpec
from raydist.data import load_data
from raydist.models import build_model

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port",
              "--object-manager-port", "--metrics-export-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--runtime-env-agent-port")
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
JOB_ARGS = ["--strategy", "ddp", "--workers", "2", "--epochs", "2", "--hidden", "16"]

pytestmark = pytest.mark.timeout(420)  # one head start, one 2-worker job, two CLI calls


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def processes_of(marker: str) -> list[int]:
    """PIDs whose command line names `marker` (the head's private temp dir: GCS, raylet,
    dashboard, agents), and all their descendants (workers, the job's driver)."""
    parent, roots = {}, []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmdline = (d / "cmdline").read_bytes()
        except OSError:
            continue
        parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        if marker.encode() in cmdline:
            roots.append(int(d.name))
    found, todo = set(roots), list(roots)
    while todo:
        pid = todo.pop()
        kids = [c for c, p in parent.items() if p == pid and c not in found]
        found.update(kids)
        todo.extend(kids)
    return sorted(found)


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a parent that is gone too."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop(pids: list[int], wait_s: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.2)


@pytest.fixture(scope="module")
def head():
    """A head with 2 CPUs; yields the dashboard address and the environment of a client that
    holds the token."""
    tmp = Path(tempfile.mkdtemp(prefix="rdj", dir="/tmp"))  # short: Ray's socket paths live here
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(tmp), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    cmd = [RAY, "start", "--head", "--num-cpus=2", "--dashboard-host=127.0.0.1",
           "--disable-usage-stats", f"--temp-dir={tmp}", f"--object-store-memory={100 * 2**20}",
           *(f"{flag}={port}" for flag, port in ports.items())]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"http://127.0.0.1:{ports['--dashboard-port']}", env, tmp
    finally:
        stop(processes_of(str(tmp)))
        shutil.rmtree(tmp, ignore_errors=True)


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
