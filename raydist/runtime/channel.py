"""The small actor between a Ray Train run's driver and its workers: per-epoch records from rank
0 to the driver, restarts and step beats for its lines and its watchdog; the driver's request to
stop, back (raydist/raytrain/driver.py reads it).

Kept free of torch and of raydist's other modules: Ray imports an actor's module in the actor's
own process, and one starts beside every fit (importing raydist.raytrain here cost every run
about 2 CPU-seconds of imports, measured)."""

from __future__ import annotations

from typing import Any

import ray

Record = dict[str, Any]


@ray.remote(num_cpus=0)
class Channel:
    """Per-epoch records from rank 0 to the driver, and restarts (Watch); the driver's
    request to stop, back. Each worker says its pid when it starts, for those lines."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.pids: dict[int, int] = {}
        self.stopping = False
        self.handle: Any = None  # Ray Train's controller (ray_compat.controller_to)

    def hello(self, rank: int, pid: int) -> None:
        self.pids[rank] = pid

    def put(self, rec: Record) -> bool:
        self.events.append(("record", rec))
        return self.stopping

    def restart(self, attempt: int, limit: int, rank: int, how: str, epoch: int,
                name: str = "ddp") -> None:
        pid = f" (pid {self.pids[rank]})" if rank in self.pids else ""
        self.events.append(("restart", (attempt, limit, f"{name} worker {rank}{pid}", epoch, how)))

    def take(self) -> list[tuple[str, Any]]:
        out, self.events = self.events, []
        return out

    def stop(self) -> None:
        self.stopping = True

    def beat(self, seconds: float) -> None:
        """Rank 0 finished steps, the longest of them `seconds` (raydist/runtime/stall.py)."""
        self.events.append(("beat", seconds))

    def controller(self, handle: Any = None) -> Any:
        """Keep Ray Train's controller (given), or return it (asked)."""
        if handle is not None:
            self.handle = handle
        return self.handle
