"""Per-epoch checkpoints of the actor strategies (ps, pipeline): one file, replaced
atomically, so a crash mid-write never leaves a torn checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

NAME = "checkpoint.pt"


def write(out: str, state: dict[str, Any]) -> None:
    path = Path(out) / NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read(out: str) -> dict[str, Any] | None:
    path = Path(out) / NAME
    return torch.load(path, weights_only=False) if path.exists() else None
