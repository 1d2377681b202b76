"""RunSpec: every knob of one training run, loaded from YAML, a dict or CLI flags, validated once.

Inner code trusts a validated spec. Names that live in a registry (strategy, model, data,
optimizer) are checked against that registry, looked up by module path so that this bottom
layer never imports the layers above it.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
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


def worker_count(x: int | list[int]) -> bool:
    """A fixed count >= 1, or an elastic range [min, max] with 1 <= min <= max."""
    return x >= 1 if isinstance(x, int) else 1 <= x[0] <= x[1]


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
    workers: int | list[int] = knob(1, "data-parallel replicas (ddp, ps); ddp also takes a range "
                                    "MIN-MAX ([min, max] in YAML): elastic, grows when nodes join",
                                    check=worker_count,
                                    expected="an integer >= 1, or [min, max] with 1 <= min <= max")
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
    use_gpu: bool | None = knob(None, "ddp, pipeline: train on GPUs (default: when the cluster "
                                "has some now)")
    max_failures: int = knob(0, "restarts from the latest checkpoint after a worker dies",
                             check=at_least(0), expected="an integer >= 0")
    grad_compression: str = knob("none", "ddp: gradient communication hook (none, fp16, bf16, "
                                 "powersgd)", registry="raydist.comm:COMPRESSIONS")
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
    schedule: str = knob("gpipe", "pipeline: micro-batch schedule", registry="raydist.pipelining:SCHEDULES")
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
        for name, broken, why in COMBINATIONS:
            if broken(self):
                raise ConfigError(f"{where}{name}: {why(self)}")
        if isinstance(self.workers, list) and self.strategy != "ddp":
            raise ConfigError(f"{where}workers: got {self.workers}; a range [min, max] (elastic "
                              f"scaling) needs strategy ddp, not '{self.strategy}'")
        if self.lr is None:
            self.lr = lookup("raydist.optim:OPTIMIZERS")[self.optimizer].default_lr

    @property
    def min_workers(self) -> int:
        """The fewest replicas the run may have: `workers`, or the low end of its range."""
        return self.workers if isinstance(self.workers, int) else self.workers[0]

    @property
    def max_workers(self) -> int:
        """The most replicas the run may have: `workers`, or the high end of its range."""
        return self.workers if isinstance(self.workers, int) else self.workers[1]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def optimizer_hparams(self) -> dict[str, float]:
        return {"beta": self.beta, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
                "weight_decay": self.weight_decay}


# Settings valid one by one but not together: (the field the error names, test, what is wrong).
COMBINATIONS: tuple[tuple[str, Any, Any], ...] = (
    ("grad_compression", lambda s: s.grad_compression == "powersgd" and s.max_workers == 1,
     lambda s: f"got 'powersgd' with workers {s.workers}; PowerSGD compresses the gradients "
               "workers exchange, so it needs workers >= 2"),
    ("local_sgd_steps", lambda s: s.local_sgd_steps > 1 and s.grad_compression != "none",
     lambda s: f"got {s.local_sgd_steps} with grad_compression '{s.grad_compression}'; local SGD "
               "exchanges parameters every k steps, no gradients to compress: set one of the two"),
)


def lookup(path: str) -> Any:
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


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


def _int_or_range(v: Any) -> int | list[int]:
    """An integer, or a pair: [min, max] (YAML, --set) or MIN-MAX (a CLI flag)."""
    if isinstance(v, str) and re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", v):
        v = v.split("-")
    if isinstance(v, str) and v.strip().startswith("["):
        v = _int_list(v)
    if isinstance(v, list | tuple):
        if len(v) != 2:
            raise ValueError(v)
        return [_int(x) for x in v]
    return _int(v)


PARSERS = {"int": _int, "float": _float, "bool": _bool, "str": _str, "list[int]": _int_list,
           "int | list[int]": _int_or_range}


def describe(base: str) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false",
            "str": "a non-empty string", "list[int]": "a list of integers",
            "int | list[int]": "an integer or a range [min, max]"}[base]


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


# --- sweeps: RunSpec fields with search leaves, plus how to search them ------------------------

SEARCH_KINDS = ("grid", "choice", "loguniform", "uniform")
SWEEP_METRICS = ("val_accuracy", "val_loss", "train_loss")
Leaf = tuple[str, list[Any]]  # (kind, values) or, for the two ranges, (kind, [low, high])


@dataclass
class SweepSpec:
    """A sweep file: RunSpec fields, each a value or a search leaf, and a `sweep:` section."""

    base: dict[str, Any]
    """fixed RunSpec fields, as written"""
    space: dict[str, Leaf]
    """searched RunSpec fields; `sweep.seeds` becomes a grid over `seed`"""
    variants: list[dict[str, Any]] = field(default_factory=list)
    """one grid axis of whole settings, e.g. local on 1 worker beside ddp on 1 and 2"""
    metric: str = "val_accuracy"
    mode: str = "max"
    target: float | None = None
    """metric value that counts as reached, for time to target"""
    samples: int = 1
    """Tune's num_samples: draws of the choice/range leaves, each crossed with every grid"""
    scheduler: str = "none"
    max_concurrent: int = 1
    scale: str = "workers"
    """the RunSpec field that is N in speedup(N)"""

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "sweep") -> SweepSpec:
        raw = dict(raw)
        settings = raw.pop("sweep", None) or {}
        if not isinstance(settings, dict):
            raise ConfigError(f"{source}: sweep: expected a mapping of setting: value")
        if "out" in raw:
            raise ConfigError(f"{source}: out: set by the sweep for each trial "
                              "(DIR/trials/<trial-id>); remove it")
        base = {k: v for k, v in raw.items() if not isinstance(v, dict)}
        RunSpec.from_dict(base, source)
        space = {k: parse_leaf(k, v, base, source) for k, v in raw.items() if isinstance(v, dict)}
        sweep = cls(base=base, space=space, **sweep_settings(settings, source))
        if "seeds" in settings:
            if "seed" in raw:
                raise ConfigError(f"{source}: seed: also set by sweep.seeds; keep one of the two")
            sweep.space["seed"] = ("grid", sweep_seeds(settings["seeds"], source))
        variants = settings.get("variants") or []
        if not isinstance(variants, list):
            raise ConfigError(f"{source}: sweep.variants: expected a list of mappings of RunSpec "
                              "field: value")
        sweep.variants = [parse_variant(v, base, sweep.space, source) for v in variants]
        return sweep

    def run_spec(self, choice: dict[str, Any], out: str) -> RunSpec:
        """The RunSpec of one trial; `choice` holds Tune's values and the trial's variant."""
        values = {k: v for k, v in choice.items() if k != "variant"}
        return RunSpec.from_dict({**self.base, **choice.get("variant", {}), **values, "out": out})


def load_sweep(path: str | Path) -> SweepSpec:
    return SweepSpec.from_dict(load_yaml(path), source=str(path))


def parse_leaf(key: str, leaf: dict[str, Any], base: dict[str, Any], source: str) -> Leaf:
    where = f"{source}: {key}"
    names = [f.name for f in fields(RunSpec)]
    if key not in names:
        raise ConfigError(f"{source}: unknown key '{key}'{closest(str(key), names)}")
    if len(leaf) != 1:
        raise ConfigError(f"{where}: a search leaf has exactly one key, one of "
                          f"{', '.join(SEARCH_KINDS)}")
    (kind, values), = leaf.items()
    if kind not in SEARCH_KINDS:
        raise ConfigError(f"{where}: unknown search kind '{kind}'{closest(str(kind), list(SEARCH_KINDS))}"
                          f"; expected one of {', '.join(SEARCH_KINDS)}")
    if kind in ("grid", "choice"):
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {kind} expects a non-empty list of values")
        return kind, [checked(key, v, base, source) for v in values]
    return kind, parse_range(key, kind, values, base, source)


def parse_range(key: str, kind: str, values: Any, base: dict[str, Any], source: str) -> list[float]:
    where = f"{source}: {key}"
    type_ = next(f.type for f in fields(RunSpec) if f.name == key)
    if type_.removesuffix(" | None") != "float":
        raise ConfigError(f"{where}: {kind} draws real numbers, but {key} is not a number field; "
                          "use grid or choice")
    rule = "0 < low < high" if kind == "loguniform" else "low < high"
    if not isinstance(values, list) or len(values) != 2:
        raise ConfigError(f"{where}: {kind} expects [low, high] with {rule}")
    low, high = (checked(key, v, base, source) for v in values)
    if not low < high or (kind == "loguniform" and low <= 0):
        raise ConfigError(f"{where}: {kind} expects [low, high] with {rule}; got [{low}, {high}]")
    return [low, high]


def checked(key: str, value: Any, base: dict[str, Any], source: str) -> Any:
    """`value` as the field's type, validated like any RunSpec value."""
    return getattr(RunSpec.from_dict({**base, key: value}, source), key)


def parse_variant(variant: Any, base: dict[str, Any], space: dict[str, Leaf],
                  source: str) -> dict[str, Any]:
    if not isinstance(variant, dict) or not variant:
        raise ConfigError(f"{source}: sweep.variants: each variant is a mapping of RunSpec field: value")
    for key, value in variant.items():
        if key in space or key == "out" or isinstance(value, dict):
            raise ConfigError(f"{source}: sweep.variants: {key} is searched or set per trial; "
                              "a variant holds plain values of other fields")
    spec = RunSpec.from_dict({**base, **variant}, source)
    return {k: getattr(spec, k) for k in variant}


def sweep_seeds(value: Any, source: str) -> list[int]:
    bad = ConfigError(f"{source}: sweep.seeds: got {value!r}; expected an integer >= 1 (seeds "
                      "0..n-1) or a list of integers >= 0")
    try:
        seeds = list(range(_int(value))) if not isinstance(value, list) else [_int(v) for v in value]
    except (TypeError, ValueError):
        raise bad from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise bad
    return seeds


SWEEP_SETTINGS: dict[str, tuple[Any, Any, str]] = {
    # name: (parser, rule, what is allowed)
    "metric": (_str, lambda v: v in SWEEP_METRICS, "one of " + ", ".join(SWEEP_METRICS)),
    "mode": (_str, lambda v: v in ("max", "min"), "one of max, min"),
    "target": (_float, None, "a number"),
    "samples": (_int, at_least(1), "an integer >= 1"),
    "scheduler": (_str, lambda v: v in ("none", "asha"), "one of none, asha"),
    "max_concurrent": (_int, at_least(1), "an integer >= 1"),
    "scale": (_str, lambda v: v in {f.name for f in fields(RunSpec) if f.type.startswith("int")},
              "an integer RunSpec field such as workers or stages"),
}


def sweep_settings(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """The scalar settings of the `sweep:` section; seeds and variants are parsed by the caller."""
    allowed = [*SWEEP_SETTINGS, "seeds", "variants"]
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if key not in allowed:
            raise ConfigError(f"{source}: sweep: unknown key '{key}'{closest(str(key), allowed)}; "
                              f"expected one of {', '.join(allowed)}")
        if key not in SWEEP_SETTINGS:
            continue
        parse, rule, expected = SWEEP_SETTINGS[key]
        if key == "scheduler" and value is None:
            value = "none"
        try:
            out[key] = parse(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: sweep.{key}: got {value!r}; expected {expected}") from None
        if rule and not rule(out[key]):
            raise ConfigError(f"{source}: sweep.{key}: got {value!r}; expected {expected}")
    out.setdefault("mode", "max" if out.get("metric", "val_accuracy") == "val_accuracy" else "min")
    return out
