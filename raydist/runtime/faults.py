"""Test and benchmark plumbing, in one helper that reaches every worker, replica and stage the
same way: the driver makes a `Faults` from its own environment and spec (`Faults.of`) and
hands it over as an argument; the process calls `maybe_fail` and `straggle`. Actors and Ray
Train workers do not inherit the driver's environment, so nothing else carries it.

- `RAYDIST_FAULT=INDEX:EPOCH` (tests): the worker, replica or stage with that index exits
  abruptly during that epoch, once per output folder (a marker file remembers that it fired, so
  the restarted attempt runs through).
- `RAYDIST_STALL=INDEX:EPOCH` (tests): at the same place, that process submits a Ray task asking
  for a resource no node has and waits on it: a wait that cannot end, for the driver's watchdog
  (raydist/runtime/stall.py) to report. Once per output folder too.
- `straggler` (benchmarks, a ps knob): replica 0 takes that many times as long per gradient."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV = "RAYDIST_FAULT"
MARKER = ".fault_fired"
STALL_ENV = "RAYDIST_STALL"
STALL_MARKER = ".stall_fired"
NOWHERE = "nonexistent"
"""The resource the stall's task asks for: no node has it."""


@dataclass(frozen=True)
class Faults:
    out: str
    """the run's output folder, where the marker is kept (absolute: workers run elsewhere)"""
    fault: str | None = None
    """'INDEX:EPOCH' or None"""
    straggler: float = 1.0
    stall: str | None = None
    """'INDEX:EPOCH' or None"""

    @classmethod
    def of(cls, spec: Any) -> Faults:
        """From the driver's environment and a RunSpec."""
        return cls(str(Path(spec.out).resolve()), os.environ.get(ENV), spec.straggler,
                   os.environ.get(STALL_ENV))

    def maybe_fail(self, index: int, epoch: int) -> None:
        if self.stall == f"{index}:{epoch}" and self.first(STALL_MARKER):
            import ray  # only ever in a Ray worker or actor

            ray.get(ray.remote(num_cpus=0, resources={NOWHERE: 1})(unschedulable).remote())
        if self.fault == f"{index}:{epoch}" and self.first(MARKER):
            os._exit(1)  # like a killed process: no clean-up, no exception

    def first(self, name: str) -> bool:
        """Whether the marker `name` is new in the output folder (it is made now)."""
        marker = Path(self.out) / name
        if marker.exists():
            return False
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return True

    def straggle(self, index: int, busy_s: float) -> None:
        """Replica 0 sleeps (straggler - 1) times what it has just been busy for."""
        if index == 0 and self.straggler > 1:
            time.sleep((self.straggler - 1) * busy_s)


def unschedulable() -> None:
    """The stall's task: it asks for NOWHERE, so Ray never runs it."""
