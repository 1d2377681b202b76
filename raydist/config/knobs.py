"""How a RunSpec field is declared: `knob` (its documentation, validation rule, readers and
whether a resumed run may change it) and the small validation rules knobs share."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from raydist.config.values import lookup


def knob(default: Any, help: str, *, check: Any = None, expected: str = "",
         registry: str = "", choices: tuple[str, ...] = (), strategies: tuple[str, ...] = (),
         resumable: bool | tuple[str, ...] = False) -> Any:
    """A RunSpec field with its documentation and its validation rule. `strategies`: the ones
    that read it (empty: every strategy); a run of another strategy refuses it unless it keeps
    its default. `resumable`: a run resumed from its checkpoint may change it (True: under
    every strategy; a tuple: under those), because it changes where and how fast the run goes,
    not what it computes."""
    meta = {"help": help, "check": check, "expected": expected, "registry": registry,
            "choices": choices, "strategies": strategies, "resumable": resumable}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def positive(x: Any) -> bool:
    return x > 0


def at_least(n: float) -> Any:
    return lambda x: x >= n


def unit_interval(x: float) -> bool:
    return 0 <= x < 1


def worker_count(x: int | list[int]) -> bool:
    """A fixed count >= 1, or an elastic range [min, max] with 1 <= min <= max."""
    return x >= 1 if isinstance(x, int) else 1 <= x[0] <= x[1]


OWNERS = {"model_args": "model", "data_args": "data"}
"""The knob naming the code each mapping knob is handed to: only a user's own (module.path:function)
takes one; a registered model or data set takes its settings as knobs of their own."""


def unread_mapping(name: str, owner: str, entries: dict[str, Any],
                   owner_knob: dataclasses.Field) -> str | None:
    """Why the mapping knob `name` holding `entries` would go unread when `owner_knob` holds
    `owner`, a registered name (its registry's package says which knobs it reads), or None."""
    registry = owner_knob.metadata["registry"]  # e.g. raydist.models:MODELS
    registered = owner.split(":", 1)[0] if name == "data_args" else owner
    if not entries or registered not in lookup(registry):
        return None
    knobs = lookup(registry.partition(":")[0] + ":knobs_of")(registered)
    flags = f"its own flags: {', '.join('--' + k.replace('_', '-') for k in knobs)}" if knobs \
        else "it has no flags of its own"
    return (f"{name}: {OWNERS[name]} '{owner}' is built in and takes no {name} (got "
            f"{', '.join(map(str, entries))}); {flags}")


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
