"""Ray heads that a test starts and stops itself, safely on a shared machine: a private temp
dir (RAY_TMPDIR), free ports, token authentication with a private token file, and shutdown
by the PIDs of the processes whose command line names that temp dir, plus their descendants
(never `ray stop`, which kills every Ray process on the machine; docs/ray-notes.md)."""

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port",
              "--object-manager-port", "--metrics-export-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--runtime-env-agent-port")
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def parents() -> dict[int, int]:
    """pid -> parent pid of every process now (Linux's /proc)."""
    found = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                found[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    return found


def descendants(pids: list[int]) -> list[int]:
    """Every process below `pids`, not `pids` themselves."""
    parent, found, todo = parents(), set(), list(pids)
    while todo:
        pid = todo.pop()
        kids = [c for c, p in parent.items() if p == pid and c not in found]
        found.update(kids)
        todo.extend(kids)
    return sorted(found)


def processes_of(marker: str) -> list[int]:
    """PIDs whose command line names `marker` (a head's private temp dir: GCS, raylet,
    dashboard, agents, fake autoscaler nodes), and all their descendants (workers, drivers)."""
    roots = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and marker.encode() in (d / "cmdline").read_bytes():
                roots.append(int(d.name))
        except OSError:
            continue
    return sorted({*roots, *descendants(roots)})


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


@dataclass
class Head:
    """One head node of our own. Made first (temp dir, token, ports), started second, so a
    caller can write files that name its addresses (an autoscaling config) in between."""

    tmp: Path
    env: dict[str, str]
    """the environment of a client that holds the token and finds no other cluster"""
    ports: dict[str, int]
    """`ray start` port flag -> a free port"""

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['--port']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['--dashboard-port']}"

    def start(self, *args: str, env: dict[str, str] | None = None, timeout: float = 180) -> None:
        cmd = [RAY, "start", "--head", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
               f"--temp-dir={self.tmp}", f"--object-store-memory={100 * 2**20}",
               *(f"{flag}={port}" for flag, port in self.ports.items()), *args]
        started = subprocess.run(cmd, env={**self.env, **(env or {})}, capture_output=True,
                                 text=True, timeout=timeout)
        assert started.returncode == 0, started.stdout + started.stderr

    def pids(self) -> list[int]:
        return processes_of(str(self.tmp))

    def stop(self) -> None:
        for _ in range(3):  # again, for what started meanwhile (an autoscaler adding a node)
            pids = self.pids()
            if not pids:
                break
            # A short grace: the Python processes end on SIGTERM within a fraction of a second,
            # while gcs_server, the raylet and the runtime-env agent were measured still running
            # 8 s after it, so a longer one only waits for the SIGKILL they get anyway.
            stop(pids, wait_s=1.0)
        shutil.rmtree(self.tmp, ignore_errors=True)


def new_head(prefix: str) -> Head:
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: Ray's socket paths live here
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_TMPDIR=str(tmp), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    # No node of a test head is ever drained: Ray Train's preemption watcher, an actor process
    # beside every worker group, would watch for nothing (as on the embedded Ray, raydist.runtime.connect).
    env.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    return Head(tmp, env, dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True)))


@contextmanager
def running_head(*args: str, prefix: str = "rdh", env: dict[str, str] | None = None) -> Iterator[Head]:
    """A started head (extra `ray start` flags in `args`), stopped by PID on the way out."""
    head = new_head(prefix)
    try:
        head.start(*args, env=env)
        yield head
    finally:
        head.stop()
