"""RunSpec: every knob of one training run, loaded from YAML, a dict or CLI flags, validated once.

Inner code trusts a validated spec. Names that live in a registry (strategy, model, data,
optimizer) are checked against that registry, looked up by module path so that this bottom
layer never imports the layers above it.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from raydist.registry import ConfigError, closest

__all__ = ["ConfigError", "RunSpec", "load_yaml", "parse_sets"]


def knob(default: Any, help: str, *, check: Any = None, expected: str = "",
         registry: str = "", choices: tuple[str, ...] = ()) -> Any:
    """A RunSpec field with its documentation and its validation rule."""
    meta = {"help": help, "check": check, "expected": expected, "registry": registry,
            "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def positive(x: Any) -> bool:
    return x > 0


def at_least(n: float) -> Any:
    return lambda x: x >= n


def unit_interval(x: float) -> bool:
    return 0 <= x < 1


@dataclass
class RunSpec:
    # --- what to train, how it is spread --------------------------------------------------
    strategy: str = knob("local", "how the run is spread over Ray",
                         registry="raydist.strategies:STRATEGIES")
    model: str = knob("mlp", "network to train", registry="raydist.models:MODELS")
    data: str = knob("digits", "data set: a registered name, csv:PATH or parquet:PATH",
                     registry="raydist.data:DATASETS")
    optimizer: str = knob("adam", "update rule (the article's six and more)",
                          registry="raydist.optim:OPTIMIZERS")
    # --- optimizer ---------------------------------------------------------------------------
    lr: float | None = knob(None, "learning rate; empty means the optimizer's documented default",
                            check=positive, expected="a number > 0")
    beta: float = knob(0.9, "decay of momentum's m and RMSprop's R",
                       check=unit_interval, expected="a number in [0, 1)")
    beta1: float = knob(0.9, "Adam's first-moment decay", check=unit_interval,
                        expected="a number in [0, 1)")
    beta2: float = knob(0.999, "Adam's second-moment decay", check=unit_interval,
                        expected="a number in [0, 1)")
    eps: float = knob(1e-8, "added outside the square root", check=positive,
                      expected="a number > 0")
    weight_decay: float = knob(0.0, "L2 penalty (decoupled for adamw)", check=at_least(0),
                               expected="a number >= 0")
    # --- schedule ----------------------------------------------------------------------------
    epochs: int = knob(5, "passes over the training set", check=at_least(1),
                       expected="an integer >= 1")
    batch_size: int = knob(64, "GLOBAL batch, whatever the worker count (gd: the whole set)",
                           check=at_least(1), expected="an integer >= 1")
    workers: int = knob(1, "data-parallel replicas (ddp, ps)", check=at_least(1),
                        expected="an integer >= 1")
    threads_per_worker: int = knob(1, "torch threads in each worker process",
                                   check=at_least(1), expected="an integer >= 1")
    seed: int = knob(0, "seed of weights, data split and batch order", check=at_least(0),
                     expected="an integer >= 0")
    out: str = knob("results/run", "directory for spec.yaml, metrics.csv, model.pt")
    # --- model options -----------------------------------------------------------------------
    hidden: list[int] = knob([64], "mlp hidden sizes, e.g. 64,32 (the article's net: 10)",
                             check=lambda v: all(h >= 1 for h in v),
                             expected="a list of integers >= 1")
    channels: int = knob(16, "cnn: channels of the first conv layer", check=at_least(1),
                         expected="an integer >= 1")
    layers: int = knob(2, "transformer blocks", check=at_least(1), expected="an integer >= 1")
    d_model: int = knob(64, "transformer width", check=at_least(1), expected="an integer >= 1")
    heads: int = knob(4, "transformer attention heads", check=at_least(1),
                      expected="an integer >= 1")
    seq_len: int = knob(32, "text: characters per training sequence", check=at_least(2),
                        expected="an integer >= 2")
    # --- data options ------------------------------------------------------------------------
    target: str | None = knob(None, "csv/parquet: target column (default: the last column)")
    val_fraction: float = knob(0.2, "share of the data held out for validation",
                               check=lambda x: 0 < x < 1, expected="a number in (0, 1)")
    samples: int = knob(2000, "synthetic: number of samples", check=at_least(10),
                        expected="an integer >= 10")
    text_chars: int = knob(200_000, "text: characters of the corpus used", check=at_least(1000),
                           expected="an integer >= 1000")
    # --- ddp / Ray ---------------------------------------------------------------------------
    address: str | None = knob(None, "Ray cluster to join (default: RAY_ADDRESS, else an "
                               "embedded local Ray)")
    use_gpu: bool | None = knob(None, "ddp: train on GPUs (default: when the cluster has any)")
    max_failures: int = knob(0, "restarts from the latest checkpoint after a worker dies",
                             check=at_least(0), expected="an integer >= 0")
    grad_compression: str = knob("none", "ddp: gradient communication hook",
                                 choices=("none", "fp16", "bf16", "powersgd"))
    powersgd_rank: int = knob(1, "ddp: PowerSGD matrix rank", check=at_least(1),
                              expected="an integer >= 1")
    bucket_cap_mb: float = knob(25.0, "ddp: gradient bucket size in MB", check=positive,
                                expected="a number > 0")
    local_sgd_steps: int = knob(1, "ddp: average parameters every k local steps (1 = plain ddp)",
                                check=at_least(1), expected="an integer >= 1")
    # --- parameter server --------------------------------------------------------------------
    mode: str = knob("sync", "ps: apply averaged gradients (sync) or each as it comes (async)",
                     choices=("sync", "async"))
    servers: int = knob(1, "ps: parameter-server actors, each owning part of the weights",
                        check=at_least(1), expected="an integer >= 1")
    max_staleness: int = knob(4, "ps async: oldest gradient (in updates) that is still applied",
                              check=at_least(0), expected="an integer >= 0")
    straggler: float = knob(1.0, "ps: slow-down factor of replica 0 (benchmarks)",
                            check=at_least(1), expected="a number >= 1")
    comm_dtype: str = knob("float32", "ps: dtype of gradients and weights on the wire",
                           choices=("float32", "float16", "bfloat16"))
    # --- pipeline ----------------------------------------------------------------------------
    stages: int = knob(2, "pipeline: stage actors the model is cut into", check=at_least(1),
                       expected="an integer >= 1")
    microbatches: int = knob(4, "pipeline: micro-batches per global batch", check=at_least(1),
                             expected="an integer >= 1")
    schedule: str = knob("gpipe", "pipeline: micro-batch schedule", choices=("gpipe", "1f1b"))
    cuts: list[int] | None = knob(None, "pipeline: explicit block indices where stages start "
                                  "(default: balanced by parameter count)",
                                  check=lambda v: all(c >= 1 for c in v),
                                  expected="a list of integers >= 1")

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "") -> RunSpec:
        """Build and validate; `source` (a file name) prefixes every error."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source or 'config'}: expected a mapping of field: value")
        where = f"{source}: " if source else ""
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in raw.items():
            if key not in known:
                raise ConfigError(f"{where}unknown key '{key}'{closest(str(key), list(known))}")
            values[key] = coerce(key, value, known[key].type, where)
        spec = cls(**values)
        spec.validate(where)
        return spec

    def replace(self, **changes: Any) -> RunSpec:
        return RunSpec.from_dict({**self.to_dict(), **changes})

    def validate(self, where: str = "") -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            meta = f.metadata
            if value is None:
                continue
            if meta["choices"] and value not in meta["choices"]:
                raise ConfigError(f"{where}{f.name}: got '{value}'{closest(value, list(meta['choices']))}"
                                  f"; expected one of {', '.join(meta['choices'])}")
            if meta["check"] and not meta["check"](value):
                raise ConfigError(f"{where}{f.name}: got {value!r}; expected {meta['expected']}")
            if meta["registry"]:
                registry = lookup(meta["registry"])
                name = value.split(":", 1)[0] if f.name == "data" else value
                if name not in registry:
                    raise ConfigError(where + registry.unknown(value))
        if self.lr is None:
            self.lr = lookup("raydist.optim:OPTIMIZERS")[self.optimizer].default_lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def optimizer_hparams(self) -> dict[str, float]:
        return {"beta": self.beta, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
                "weight_decay": self.weight_decay}


def lookup(path: str) -> Any:
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def help_of(name: str) -> str:
    return next(f.metadata["help"] for f in fields(RunSpec) if f.name == name)


# --- turning YAML / CLI values into the field's type ------------------------------------------

def coerce(name: str, value: Any, type_: str, where: str = "") -> Any:
    optional = type_.endswith("| None")
    base = type_.removesuffix(" | None")
    if value is None or (optional and isinstance(value, str) and value in ("", "null", "none")):
        if optional:
            return None
        raise ConfigError(f"{where}{name}: got nothing; expected {describe(base)}")
    try:
        return PARSERS[base](value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}{name}: got {value!r}; expected {describe(base)}") from None


def _int(v: Any) -> int:
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError(v)
    return int(v) if not isinstance(v, str) else int(v.strip())


def _float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(v)
    x = float(v)
    if not math.isfinite(x):
        raise ValueError(v)
    return x


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "yes", "1", "false", "no", "0"):
        return v.lower() in ("true", "yes", "1")
    raise ValueError(v)


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(v)
    return v


def _int_list(v: Any) -> list[int]:
    if isinstance(v, str):
        v = [p for p in v.strip("[] ").split(",") if p.strip()]
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, list):
        raise ValueError(v)
    return [_int(x) for x in v]


PARSERS = {"int": _int, "float": _float, "bool": _bool, "str": _str, "list[int]": _int_list}


def describe(base: str) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false",
            "str": "a non-empty string", "list[int]": "a list of integers"}[base]


# --- files and overrides ----------------------------------------------------------------------

def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{line}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of field: value at the top level")
    return raw


def parse_sets(items: list[str]) -> dict[str, str]:
    """`--set key=value` pairs; values stay strings and are typed by `coerce`."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set: got '{item}'; expected key=value")
        out[key.strip()] = value.strip()
    return out
