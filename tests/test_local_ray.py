"""`raydist ray start|stop`: one local Ray kept between commands; `raydist train` joins it (and
leaves it running), and only a head this user's own file names, on this machine, alive."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from raydist.runtime import connect

RAYDIST = [sys.executable, "-m", "raydist.cli"]
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")  # the venv's `ray` CLI, as the README writes it


def write_head(path: Path, mode: int = 0o600, **info: object) -> None:
    path.write_text(yaml.safe_dump({"address": "127.0.0.1:6379", "pid": os.getpid(),
                                    "cpus": 4, "api_server": "http://127.0.0.1:1", **info}))
    path.chmod(mode)


@pytest.mark.unit
def test_only_this_users_loopback_head_that_lives(tmp_path, monkeypatch):
    path = tmp_path / "local-ray.yaml"
    monkeypatch.setenv(connect.LOCAL_RAY, str(path))
    assert connect.local_head() is None  # no file
    write_head(path)
    assert connect.local_head()["address"] == "127.0.0.1:6379"
    write_head(path, address="10.255.0.5:6379")  # somebody's cluster, not this machine's
    assert connect.local_head() is None
    write_head(path, mode=0o666)  # a file anyone could have written
    assert connect.local_head() is None
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_head(path, pid=dead.pid)  # its keeper is gone
    assert connect.local_head() is None
    path.write_text("address: [")
    assert connect.local_head() is None


@pytest.mark.multinode
@pytest.mark.timeout(600)
def test_the_kept_ray_takes_a_train_that_joins_and_a_submitted_job(tmp_path):
    """As the README's laptop flow goes, from a shell WITHOUT the venv on PATH: `raydist ray
    start`; a ddp `raydist train` joins it, says so and leaves it running; then the venv's `ray
    job submit --working-dir .` of jobs/train.py to the job server `raydist ray status` names
    (one kept head for both: each start and stop costs the suite half a minute). The job's
    `python` is the one on the head's PATH, which the keeper puts raydist's interpreter first on
    (else: the system's, without torch). A private
    HOME (so a private ~/.ray/auth_token), RAY_TMPDIR and RAYDIST_LOCAL_RAY file; the head is
    always stopped by `raydist ray stop`, and its keeper killed by pid if that failed."""
    home = Path(tempfile.mkdtemp(prefix="rdlj", dir="/tmp"))  # short: Ray's socket paths
    venv = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv)
    keep = ("LANG", "LC_ALL", "TZ", "USER", "LOGNAME")
    env = {**{k: os.environ[k] for k in keep if k in os.environ}, "PATH": path, "HOME": str(home),
           connect.LOCAL_RAY: str(home / "local-ray.yaml"), "RAY_TMPDIR": str(home)}
    out, pid = tmp_path / "job", None
    try:
        started = subprocess.run([*RAYDIST, "ray", "start", "--cpus", "4"], cwd=REPO, env=env,
                                 text=True, capture_output=True, timeout=180)
        assert started.returncode == 0, started.stderr
        assert started.stdout.startswith("local Ray at ")
        head = yaml.safe_load((home / "local-ray.yaml").read_text())
        pid, api = head["pid"], head["api_server"]
        run = subprocess.run([*RAYDIST, "train", "--strategy", "ddp", "--workers", "1", "--epochs",
                              "1", "--out", str(tmp_path / "run")], cwd=REPO, env=env, text=True,
                             capture_output=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert "note: joining the local Ray at " in run.stderr
        assert (tmp_path / "run" / "model.pt").exists()
        assert connect.alive(pid)  # the run left it running
        status = subprocess.run([*RAYDIST, "ray", "status"], cwd=REPO, env=env, text=True,
                                capture_output=True, timeout=60)
        assert status.stdout.splitlines()[0].endswith(f"(pid {pid}) runs")
        assert status.stdout.splitlines()[1] == (
            f"job server: {api} (RAY_AUTH_MODE=token .venv/bin/ray job submit --address {api} "
            "--working-dir . -- python jobs/train.py ...)")
        job = [RAY, "job", "submit", "--address", api, "--working-dir", ".", "--", "python",
               "jobs/train.py", "--strategy", "ddp", "--workers", "2", "--epochs", "1",
               "--hidden", "16", "--out", str(out)]
        for _ in range(3):  # Ray's job server answers "try again later" while its agent is busy
            done = subprocess.run(job, cwd=REPO, env={**env, "RAY_AUTH_MODE": head["auth_mode"]},
                                  text=True, capture_output=True, timeout=420)
            log = done.stdout + done.stderr
            if "No available agent to submit job" not in log:
                break
            time.sleep(5)
        assert done.returncode == 0, log
        assert "succeeded" in log and "epoch 1  train_loss" in log
        assert yaml.safe_load((out / "spec.yaml").read_text())["strategy"] == "ddp"
        assert (out / "metrics.csv").read_text().count("\n") == 2 and (out / "model.pt").exists()
    finally:
        stopped = subprocess.run([*RAYDIST, "ray", "stop"], cwd=REPO, env=env, text=True,
                                 capture_output=True, timeout=90)
        if pid is not None and connect.alive(pid):
            os.kill(pid, signal.SIGTERM)
            time.sleep(5)
        shutil.rmtree(home, ignore_errors=True)
    assert stopped.stdout.strip().endswith(f"(pid {pid}) stopped")
    assert not connect.alive(pid) and not (home / "local-ray.yaml").exists()
