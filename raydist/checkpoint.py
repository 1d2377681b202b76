"""How runs survive: the per-epoch checkpoint of the actor strategies (ps, pipeline), one file
replaced atomically so that a crash mid-write never leaves a torn checkpoint, and how often an
actor strategy restarts after its actors die. Which settings a resumed run may change is the
knobs' own metadata (config/run.py), checked by the pre-flight."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from raydist.registry import ConfigError

NAME = "checkpoint.pt"
START_RETRIES = 3
"""Restarts whose new actors die before they ever run (placed on a node that has just died but
that Ray has not yet declared dead: seconds) are retried this often, apart from max_failures."""


def write(out: str, state: dict[str, Any]) -> None:
    path = Path(out) / NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read(out: str) -> dict[str, Any] | None:
    path = Path(out) / NAME
    return torch.load(path, weights_only=False) if path.exists() else None


def resume(spec: Any) -> dict[str, Any] | None:
    """The checkpoint in spec.out (a RunSpec) if there is one, after checking that it is not
    past the run's epochs; None to start afresh. Whether it is of this run is the pre-flight's
    check (engine/preflight.py)."""
    saved = read(spec.out)
    if saved is None:
        return None
    done = len(saved["history"])
    if done > spec.epochs:
        raise ConfigError(f"epochs: got {spec.epochs}, but the checkpoint in {spec.out} is at "
                          f"epoch {done}; expected epochs >= {done}")
    return saved


class Restarts:
    """Counts an actor strategy's restarts: actors that die before they start (retried
    START_RETRIES times) apart from deaths while training (retried spec.max_failures times)."""

    def __init__(self, strategy: str, max_failures: int, error: type[Exception]) -> None:
        self.strategy, self.max_failures, self.error = strategy, max_failures, error
        self.unstarted = self.failures = 0

    def before_start(self, e: Exception) -> None:
        self.unstarted += 1
        if self.unstarted > START_RETRIES:
            raise self.error(f"{self.strategy}: actors died before they started, {self.unstarted} "
                             f"times ({type(e).__name__})") from e

    def while_training(self, e: Exception) -> None:
        self.failures += 1
        if self.failures > self.max_failures:
            raise self.error(f"{self.strategy}: an actor died ({type(e).__name__}) and "
                             f"max_failures={self.max_failures} restarts are used up") from e
