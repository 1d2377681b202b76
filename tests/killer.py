"""Kills from outside: a background thread that SIGKILLs a randomly chosen process of a run's
actors at random moments, found through Ray's State API (`ray.util.state.list_actors`), for
tests/test_kills.py and bench/soak_kills.py.

Only a process that is an actor of one of the run's classes (ddp, fsdp: Ray Train's workers; ps:
servers and replicas; pipeline: stages), alive in the Ray this process is connected to, AND
a descendant of this process (the embedded Ray's raylet is its child, the workers the raylet's)
is ever killed: never a controller, a channel, or anything of another Ray on the machine."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ray.util.state import list_actors
from rayprocs import parents

CLASSES = {"ddp": ("RayTrainWorker",), "fsdp": ("RayTrainWorker",), "ps": ("Server", "Replica"),
           "pipeline": ("Stage",)}


def descends_from(pid: int, root: int) -> bool:
    up = parents()
    while pid in up and pid > 1:
        if pid == root:
            return True
        pid = up[pid]
    return pid == root


def still(name: str, pid: int) -> bool:
    """`pid` is still that actor's process (Ray names it `ray::Class...`) under this process."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return title.startswith(f"ray::{name}".encode()) and descends_from(pid, os.getpid())


@dataclass
class Killer:
    """Sends `kills` SIGKILLs, each `delay` (a random range, seconds) after the run's actors of
    a new attempt are all alive, to one of them chosen at random; stops when told."""

    strategy: str
    actors: int
    """how many actors of those classes an attempt has"""
    kills: int = 2
    seed: int = 0
    delay: tuple[float, float] = (0.3, 2.0)
    killed: list[tuple[str, int]] = field(default_factory=list)
    """(class, pid) of every process killed, in order"""

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="killer", daemon=True)

    def __enter__(self) -> Killer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(30)

    def alive(self) -> list[tuple[str, int]]:
        rows = list_actors(filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False)
        return [(a.class_name, a.pid) for a in rows
                if a.class_name in CLASSES[self.strategy] and a.pid and descends_from(a.pid, os.getpid())]

    def attempt(self, old: set[int]) -> list[tuple[str, int]]:
        """Wait for a full attempt of actors none of which was alive before (`old` pids)."""
        while not self.stopped.is_set():
            now = [a for a in self.alive() if a[1] not in old]
            if len(now) >= self.actors:
                return now
            self.stopped.wait(0.2)
        return []

    def run(self) -> None:
        seen: set[int] = set()
        for _ in range(self.kills):
            victims = self.attempt(seen)
            if not victims or self.stopped.wait(self.rng.uniform(*self.delay)):
                return
            seen |= {pid for _, pid in victims}
            name, pid = self.rng.choice(sorted(victims))
            if not still(name, pid):  # it ended meanwhile (the run restarted or finished)
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.killed.append((name, pid))
            time.sleep(0.1)
