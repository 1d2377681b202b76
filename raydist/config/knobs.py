"""How a RunSpec field is declared: `knob` (its documentation, validation rule, readers and
whether a resumed run may change it), the registries its names are checked against
(`registry_of`) and the small validation rules knobs share."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import field
from typing import Any

from raydist.registry import Registry
from raydist.strategies import STRATEGIES, on_ray, values_of

ON_RAY = "the strategies that run on Ray"
"""A knob's `strategies` when every strategy on Ray reads it: which those are is each
strategy's own (its `resources`), asked of the strategy registry when a knob's readers matter."""


def knob(default: Any, help: str, *, check: Any = None, expected: str = "",
         registry: bool = False, choices: tuple[str, ...] = (), strategies: tuple[str, ...] | str = (),
         resumable: bool | tuple[str, ...] = False) -> Any:
    """A RunSpec field with its documentation and its validation rule. `registry`: its value
    names an entry of `registry_of(field)`. `strategies`: the ones that read it (empty: every
    strategy; ON_RAY: those on Ray); a run of another strategy refuses it unless it keeps its
    default. `resumable`: a run resumed from its checkpoint may change it (True: under
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
    registered = owner.split(":", 1)[0] if name == "data_args" else owner
    if not entries or registered not in registry_of(owner_knob.name):
        return None
    knobs = knobs_of(owner_knob.name)(registered)
    flags = f"its own flags: {', '.join('--' + k.replace('_', '-') for k in knobs)}" if knobs \
        else "it has no flags of its own"
    return (f"{name}: {OWNERS[name]} '{owner}' is built in and takes no {name} (got "
            f"{', '.join(map(str, entries))}); {flags}")


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def readers_of(f: dataclasses.Field) -> tuple[str, ...]:
    """The strategies that read the knob `f` (empty: every strategy)."""
    named = f.metadata["strategies"]
    return tuple(n for n in STRATEGIES if on_ray(n)) if named == ON_RAY else named


def read_by(f: dataclasses.Field, strategy: str) -> bool:
    """Whether a run of `strategy` reads the knob `f` (ON_RAY asks only `strategy`'s module)."""
    named = f.metadata["strategies"]
    return on_ray(strategy) if named == ON_RAY else not named or strategy in named


def registry_of(name: str) -> Registry[Any]:
    """The registry the values of knob `name` are names in. Imported here, on first use rather
    than at the top: models and data import torch, and `import raydist.config` stays light;
    a strategy's own values (ddp's compressions, pipeline's schedules) come from its package."""
    from raydist.data import DATASETS
    from raydist.models import MODELS
    from raydist.optim import OPTIMIZERS
    from raydist.optim.lr_schedules import LR_SCHEDULES, SCALINGS
    from raydist.tracking import TRACKERS

    found = {"strategy": STRATEGIES, "model": MODELS, "data": DATASETS, "optimizer": OPTIMIZERS,
             "lr_scaling": SCALINGS, "lr_schedule": LR_SCHEDULES, "tracking": TRACKERS}
    return found[name] if name in found else values_of(name)


def knobs_of(name: str) -> Any:
    """The function naming the knobs a registered value of knob `name` (model, data) reads."""
    from raydist import data, models  # import torch: only when a mapping is given

    return {"model": models.knobs_of, "data": data.knobs_of}[name]


def unshardable(optimizer: str) -> str:
    """Why ZeRO-1 cannot shard `optimizer`'s state ('' if it can): optim's rule."""
    from raydist import optim  # imports torch: only when shard_optimizer is set

    return optim.unshardable(optimizer)


def c_compiler() -> str | None:
    """The C++ compiler torch.compile would build its CPU kernels with, if one is on PATH."""
    return next(filter(None, map(shutil.which, ("cc", "gcc", "g++", "clang"))), None)
