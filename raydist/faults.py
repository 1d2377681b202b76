"""Test-only fault injection: `RAYDIST_FAULT=INDEX:EPOCH` makes the worker, replica or stage
with that index exit abruptly during that epoch, once per output folder (a marker file
remembers it fired, so the restarted attempt runs through)."""

from __future__ import annotations

import os
from pathlib import Path

MARKER = ".fault_fired"


def maybe_fail(out: str, index: int, epoch: int) -> None:
    fault = os.environ.get("RAYDIST_FAULT")
    if not fault or f"{index}:{epoch}" != fault:
        return
    marker = Path(out) / MARKER
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    os._exit(1)  # like a killed process: no clean-up, no exception
