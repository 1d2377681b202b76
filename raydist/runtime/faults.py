"""Test and benchmark plumbing, in one helper that reaches every worker, replica and stage the
same way: the driver makes a `Faults` from its own environment and spec (`Faults.of`) and
hands it over as an argument; the process calls `maybe_fail` and `straggle`. Actors and Ray
Train workers do not inherit the driver's environment, so nothing else carries it.

- `RAYDIST_FAULT=INDEX:EPOCH` (tests): the worker, replica or stage with that index exits
  abruptly during that epoch, once per output folder (a marker file remembers that it fired, so
  the restarted attempt runs through).
- `straggler` (benchmarks, a ps knob): replica 0 takes that many times as long per gradient."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV = "RAYDIST_FAULT"
MARKER = ".fault_fired"


@dataclass(frozen=True)
class Faults:
    out: str
    """the run's output folder, where the marker is kept (absolute: workers run elsewhere)"""
    fault: str | None = None
    """'INDEX:EPOCH' or None"""
    straggler: float = 1.0

    @classmethod
    def of(cls, spec: Any) -> Faults:
        """From the driver's environment and a RunSpec."""
        return cls(str(Path(spec.out).resolve()), os.environ.get(ENV), spec.straggler)

    def maybe_fail(self, index: int, epoch: int) -> None:
        if self.fault != f"{index}:{epoch}":
            return
        marker = Path(self.out) / MARKER
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        os._exit(1)  # like a killed process: no clean-up, no exception

    def straggle(self, index: int, busy_s: float) -> None:
        """Replica 0 sleeps (straggler - 1) times what it has just been busy for."""
        if index == 0 and self.straggler > 1:
            time.sleep((self.straggler - 1) * busy_s)
