"""The one pre-flight, before any training starts or any folder is made, in this order: the
spec (validated when it was built), the data and the model, what the strategy needs (knobs it
does not read are refused by name), the output folder, whether a run already in that folder
may be resumed by this spec, and last the cluster's capacity: asking a cluster costs a Ray
start (seconds on a laptop), so every check that needs none comes first. Every failure is a
ConfigError: one line naming the field or file."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import yaml

from raydist import checkpoint
from raydist.config import ConfigError, RunSpec
from raydist.config.run import resumable
from raydist.data import Dataset, load_data
from raydist.models import build_model

SPEC_FILE = "spec.yaml"


def preflight(spec: RunSpec, strategy: ModuleType) -> Dataset:
    """Check `spec` for `strategy` (a module of raydist.strategies); returns the data set."""
    data = load_data(spec)
    build_model(spec, data)
    spec.refuse_unread()
    strategy.check(spec, data)
    check_out(spec.out)
    if strategy.RESUMES:
        check_resumable(spec, Path(spec.out) / SPEC_FILE)
        checkpoint.resume(spec)  # an actor strategy's checkpoint must not be past spec.epochs
    if strategy.resources is not None:  # a Ray strategy: join (or start) Ray, measure it
        from raydist import cluster  # imports Ray: the engine itself imports without it

        cluster.connect(spec)
        cluster.require(*strategy.resources(spec))
    return data


def check_out(out: str) -> None:
    """`out` is a folder that exists and is writable, or can be created."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out: {out} is a file; expected a folder (created if missing)")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"out: cannot create {out}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise ConfigError(f"out: {out} {what}")


def check_resumable(spec: RunSpec, saved: Path) -> None:
    """A run resumed with other training settings would silently splice two runs together:
    only the knobs marked resumable for its strategy (where and how fast it runs) may change."""
    if not saved.is_file():
        return
    try:
        old = yaml.safe_load(saved.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"out: {saved} cannot be read ({type(e).__name__}); choose another out") from None
    if not isinstance(old, dict):
        raise ConfigError(f"out: {saved} holds no run spec; choose another out")
    strategy = old.get("strategy", spec.strategy)
    allowed = resumable(spec.strategy)
    for key, value in spec.to_dict().items():
        if key not in allowed and old.get(key) != value:
            raise ConfigError(f"{key}: got {value!r}, but {spec.out} holds a {strategy} run with "
                              f"{key}={old.get(key)!r}; resume it with the same settings "
                              f"(only {', '.join(allowed)} may change) or choose another out")
