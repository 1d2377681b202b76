"""`raydist ray start|stop|status`: one local Ray kept running between commands, so that a user
iterating on a laptop pays Ray's start-up once, not per `raydist train` / `sweep`.

`start` launches a keeper process (`python -m raydist.runtime.local_ray`, its own session) that starts a
head exactly as an embedded run does (connect.start_local: dashboard on loopback, Ray's token
authentication on, the trial_driver resource a sweep needs) and writes where it is to a file
only this user can write (connect.local_ray_file()); `stop` ends that keeper by its process id,
and its Ray's processes end with it. Every raydist command given no address joins that Ray
(connect.local_head: only a head this user's own file names, at an address of this machine,
whose keeper is this user's live process) and says so; never a stranger's cluster.

Its job server (the dashboard, on loopback: the file's api_server) takes `ray job submit` too;
jobs run with raydist's own interpreter (keeper_env) and must send the head's token
(RAY_AUTH_MODE as the file's auth_mode says, ~/.ray/auth_token).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import ray
import yaml

from raydist.config import ConfigError
from raydist.runtime import connect, ray_compat

START_S = 120.0
"""How long `start` waits for the keeper to write its file (Ray's start-up, on a loaded laptop)."""
AGENT_S = 60.0
"""How long the keeper waits for its head's job agent before it says the head is ready: a job
submitted before the agent registers is refused by Ray's job server."""


def start(cpus: int | None = None) -> dict:
    """Launch the keeper and wait for its file; the head it runs. Refused if one runs already."""
    path = connect.local_ray_file()
    running = connect.local_head()
    if running:
        raise ConfigError(f"ray start: a local Ray runs already at {running['address']} (pid "
                          f"{running['pid']}); stop it with `raydist ray stop`")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "raydist.runtime.local_ray", str(cpus or os.cpu_count() or 1)]
    log = open(path.with_suffix(".log"), "w")  # noqa: SIM115 (the keeper's own stdout/stderr)
    keeper = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env=keeper_env())
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        head = connect.local_head()
        if head:
            return head
        if keeper.poll() is not None:
            raise ConfigError(f"ray start: the local Ray failed to start; see {log.name}")
        time.sleep(0.2)
    keeper.terminate()
    raise ConfigError(f"ray start: the local Ray did not start in {START_S:g} s; see {log.name}")


def keeper_env() -> dict[str, str]:
    """This environment with raydist's own interpreter's folder (the venv's bin/) first on PATH.
    The head's processes inherit the keeper's environment, and a job submitted to it runs its
    entrypoint's `python` from that PATH: without this, a shell that called `.venv/bin/raydist ray
    start` without the venv on PATH gave jobs the system's python, which has no torch."""
    here = os.path.dirname(sys.executable)
    rest = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != here]
    return {**os.environ, "PATH": os.pathsep.join([here, *rest])}


def stop() -> dict | None:
    """End the keeper (it shuts its Ray down); the head it ran, or None if none ran."""
    head = connect.local_head()
    if head is None:
        connect.local_ray_file().unlink(missing_ok=True)
        return None
    os.kill(head["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 60
    while connect.alive(head["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    connect.local_ray_file().unlink(missing_ok=True)
    return head


def keep(cpus: int) -> None:
    """The keeper: start the head, write the file (mode 0600), wait for SIGTERM, shut down."""
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    connect.start_local(num_cpus=cpus, resources={"trial_driver": 8})
    address = ray.get_runtime_context().gcs_address
    recorded = Path(ray_compat.record_head(address))  # the cluster its jobs' drivers join
    deadline = time.monotonic() + AGENT_S
    while not ray_compat.job_agent_ready() and time.monotonic() < deadline:
        time.sleep(0.2)  # `raydist ray start` returns once a job can be submitted
    path = connect.local_ray_file()
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        # Ray turned token authentication on for this new head in this process's environment
        # (RAY_AUTH_MODE); a command that joins must ask for it too, or the head refuses it
        yaml.safe_dump({"address": address, "pid": os.getpid(), "cpus": cpus,
                        "api_server": os.environ[connect.API_SERVER],
                        "auth_mode": os.environ.get(connect.AUTH_MODE, "disabled")}, f)
    tmp.replace(path)
    try:
        while not done.wait(1.0):
            pass
    finally:
        path.unlink(missing_ok=True)
        if recorded.is_file() and recorded.read_text().strip() == address:  # not a later head's
            recorded.unlink()
        ray.shutdown()


if __name__ == "__main__":
    keep(int(sys.argv[1]))
