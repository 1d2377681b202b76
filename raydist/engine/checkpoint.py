"""How runs survive: the files a run writes and reads back (checkpoints, model.pt), as plain data.

Every such file is written to a temporary name beside it and then renamed over it (`replacing`),
so a run killed mid-write leaves the previous file whole. A checkpoint holds plain data only
(`PLAIN`: tensors, numbers, strings, None, and dicts, lists and tuples of them) and is read with
torch.load(weights_only=True): a results folder from elsewhere may be tampered with, and unpickling
anything else could run its code. Which settings a resumed run may change is the knobs' own
metadata (config/run.py), checked by the pre-flight."""

from __future__ import annotations

import os
import pickle
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from raydist.errors import ConfigError

NAME = "checkpoint.pt"

PLAIN = (bool, int, float, str, type(None))
"""What a saved file may hold besides tensors, dicts, lists and tuples: what weights_only=True
reads back exactly as it was. Exact types: numpy's float64 is a float, but unpickles only as numpy."""
CONTAINERS = (dict, OrderedDict, list, tuple)


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary name in `path`'s folder to write to; renamed over `path` once written and on
    disk, so `path` is always the old file or the new one, never a torn one. Removed on failure."""
    # not mkstemp: its files are private (0600), and the renamed file would keep that mode
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        with tmp.open("rb") as f:  # else a power loss may persist the rename before the data
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save(path: Path, state: Any) -> None:
    """Write `state` (plain data only) to `path` atomically."""
    check_plain(state, path.name)
    with replacing(path) as tmp:
        torch.save(state, tmp)


def check_plain(value: Any, where: str) -> None:
    """Raises TypeError naming the first value that weights_only=True would refuse to load."""
    if type(value) in CONTAINERS:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if type(key) not in PLAIN:
                raise TypeError(f"{where}: a key of type {type(key).__name__} cannot be saved; "
                                "a checkpoint holds plain data only (raydist/engine/checkpoint.py)")
            check_plain(item, f"{where}[{key!r}]")
    elif type(value) not in PLAIN and not isinstance(value, torch.Tensor):  # a Parameter too
        raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__name__}; a checkpoint "
                        "holds tensors, numbers, strings and dicts, lists and tuples of them only")


def load(path: Path) -> dict[str, Any]:
    """A raydist checkpoint (a dict with the run's `history`), unpickling nothing but plain data;
    ConfigError naming the file otherwise."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols: one line only
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{path}: not a raydist checkpoint (refused to unpickle: {refused(e)}); "
                          "remove it or choose another out") from None
    except Exception as e:  # noqa: BLE001 - a torn or foreign file: whatever torch raises
        raise ConfigError(f"{path}: not a raydist checkpoint (cannot read it: {type(e).__name__}: "
                          f"{first_sentence(str(e))}); remove it or choose another out") from None
    if not isinstance(state, dict) or not isinstance(state.get("history"), list):
        raise ConfigError(f"{path}: not a raydist checkpoint (no history in it); remove it or "
                          "choose another out")
    return state


def refused(e: pickle.UnpicklingError) -> str:
    """What torch's weights_only error says it refused: the first line after its preamble (torch
    words it differently for a forbidden function, a blocked module or an unknown opcode)."""
    text = str(e)
    detail = text.partition("WeightsUnpickler error:")[2] or text.partition("\n")[2]
    return first_sentence(detail) or first_sentence(text)


def first_sentence(text: str) -> str:
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    return line.split(". ", 1)[0].removesuffix(".")


def write(out: str, state: dict[str, Any]) -> None:
    path = Path(out) / NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    save(path, state)


def read(out: str) -> dict[str, Any] | None:
    path = Path(out) / NAME
    return load(path) if path.exists() else None


def resume(spec: Any) -> dict[str, Any] | None:
    """The checkpoint in spec.out (a RunSpec) if there is one, after checking that it is a
    raydist checkpoint not past the run's epochs; None to start afresh. Whether it is of this run
    is the pre-flight's check (engine/preflight.py)."""
    saved = read(spec.out)
    if saved is None:
        return None
    done = len(saved["history"])
    if done > spec.epochs:
        raise ConfigError(f"epochs: got {spec.epochs}, but the checkpoint in {spec.out} is at "
                          f"epoch {done}; expected epochs >= {done}")
    return saved


def check_saved(spec: Any) -> None:
    """The pre-flight's check (a strategy's `check_saved`) of a strategy that resumes from
    spec.out/checkpoint.pt (ps, pipeline): plain data, not past spec.epochs (`resume`)."""
    resume(spec)
