"""The strategy registry: each strategy's name and the module that holds it, imported on first
use (`get`). It imports nothing of raydist but the registry, so that it sits low in the layers:
config checks `strategy` (and the knob values a strategy owns, `values_of`) against it.
`raydist.train` runs one.

A strategy is a module (local.py) or a package (ddp/, ps/, pipeline/, fsdp/, tp/) holding everything of
it and nothing of another's, with:
- `check(spec, data)`: what it needs of the spec and data (ConfigError before anything runs);
- `resources`: `resources(spec, gpus) -> (CPUs, GPUs, what)` it asks of a cluster that has `gpus`
  GPUs now (with 0 before Ray starts: an embedded Ray is sized to its CPUs), or None for a
  strategy that runs without Ray (`on_ray`);
- `RESUMES`: whether a run continues from the checkpoint in its output folder, and with it
  `check_saved(spec)`: the pre-flight's refusal (ConfigError) of a checkpoint there that this run
  cannot resume from (not plain data: raydist/engine/checkpoint.py; past spec.epochs);
- `run(spec, report) -> RunResult`: the recipe, driving the engine's epoch loop.
Adding one is a new module or package and its name below; strategies never import each other.

The Ray Train machinery ddp and fsdp share lives outside strategies, in raydist/raytrain/.
Modules are imported on first use: `ddp` pulls in Ray Train, which every ps replica and
pipeline stage process would otherwise pay for at start-up."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from raydist.registry import Registry

STRATEGIES: Registry[str] = Registry("strategy")
for _name in ("local", "ddp", "ps", "pipeline", "fsdp", "tp"):
    STRATEGIES.register(_name)(f"raydist.strategies.{_name}")

OWN_VALUES = {"grad_compression": "raydist.strategies.ddp.comm:COMPRESSIONS",
              "schedule": "raydist.strategies.pipeline.schedules:SCHEDULES"}
"""Knobs whose values a strategy defines (knob -> its registry, in the strategy that reads the
knob). Named here, not imported: importing them runs the strategy package's __init__, which
imports the engine; a spec's validation asks for them only when it checks a value."""


def get(name: str) -> ModuleType:
    """The strategy module `name` (ConfigError naming the choices if there is none)."""
    return importlib.import_module(STRATEGIES[name])


def values_of(knob: str) -> Registry[Any]:
    """The registry of the values `knob` (one of OWN_VALUES) takes, from its strategy."""
    module, attr = OWN_VALUES[knob].split(":")
    return getattr(importlib.import_module(module), attr)


def on_ray(name: str) -> bool:
    """Whether strategy `name` runs on Ray: it asks a cluster for resources (local does not)."""
    return get(name).resources is not None
