"""SweepSpec: RunSpec fields, each a value or a search leaf, and how to search them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from raydist.config.knobs import OWNERS, default_of, unread_mapping
from raydist.config.run import KNOBS, RunSpec, at_least, read_only
from raydist.config.search_rules import SCHEDULERS, SEARCHES, check_search
from raydist.config.values import (
    MAPPINGS,
    as_bool,
    as_float,
    as_int,
    as_str,
    load_yaml,
    parse_bandwidth,
    parse_duration,
)
from raydist.errors import ConfigError, closest

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
    """Tune's num_samples: draws of the choice/range leaves (random: each crossed with every
    grid; optuna: the number of trials)"""
    search: str = "grid"
    """grid, random or optuna (config/search.py); unset: random if a leaf is drawn, else grid"""
    search_seed: int = 0
    """seeds the random and optuna draws and PBT's perturbations: the same file draws the same"""
    scheduler: str = "none"
    perturb: list[str] = field(default_factory=list)
    """pbt: the fields it perturbs mid-run, within their leaves' bounds"""
    perturbation_interval: int = 1
    """pbt: epochs between two perturbations"""
    max_concurrent: int = 1
    scale: str = "workers"
    """the RunSpec field that is N in speedup(N)"""
    bound: bool = False
    """measure the machine's compute-only bound beside the trials (raydist/plan/machine_bound.py)"""
    plan: dict[str, Any] | None = None
    """predict the scaled setting on a cluster after the trials (`raydist plan`): workers (the
    largest count), bandwidth and latency of its links, one worker per node"""

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "sweep") -> SweepSpec:
        raw = dict(raw)
        settings = raw.pop("sweep", None) or {}
        if not isinstance(settings, dict):
            raise ConfigError(f"{source}: sweep: expected a mapping of setting: value")
        if "out" in raw:
            raise ConfigError(f"{source}: out: set by the sweep for each trial "
                              "(DIR/trials/<trial-id>); remove it")
        raw = spread(raw)
        base = {k: v for k, v in raw.items() if not is_leaf(k, v)}
        RunSpec.from_dict(base, source)
        space = {k: parse_leaf(k, v, base, source) for k, v in raw.items() if is_leaf(k, v)}
        sweep = cls(base=base, space=space, **sweep_settings(settings, source))
        if "seeds" in settings:
            if "seed" in raw:
                raise ConfigError(f"{source}: seed: also set by sweep.seeds; keep one of the two")
            seeds = sweep_seeds(settings["seeds"], source)
            sweep.space["seed"] = ("grid", [checked("seed", s, base, source) for s in seeds])
        variants = settings.get("variants") or []
        if not isinstance(variants, list):
            raise ConfigError(f"{source}: sweep.variants: expected a list of mappings of RunSpec "
                              "field: value")
        sweep.variants = [parse_variant(v, base, sweep.space, source) for v in variants]
        sweep.perturb = field_names(settings.get("perturb") or [], "sweep.perturb", source)
        sweep.plan = cluster_plan(settings.get("plan"), source)
        check_search(sweep, settings, source)
        refuse_unread_mappings(sweep, source)
        return sweep

    def run_spec(self, choice: dict[str, Any], out: str) -> RunSpec:
        """The RunSpec of one trial; `choice` holds Tune's values and the trial's variant. The
        trial gets only the knobs its strategy reads (the others keep their defaults)."""
        values = {k: v for k, v in choice.items() if k != "variant"}
        raw = {**self.base, **choice.get("variant", {}), **values, "out": out}
        return RunSpec.from_dict(read_only(raw))

    def trial_grid(self) -> list[dict[str, Any]]:
        """Every combination of the grid leaves with every variant, as one grid axis of whole
        settings. Each keeps only the knobs its trial's strategy reads, so that two
        combinations differing only in knobs their strategy ignores are one trial."""
        grids = {k: values for k, (kind, values) in self.space.items() if kind == "grid"}
        out: list[dict[str, Any]] = []
        for values in itertools.product(*grids.values()):
            for variant in self.variants or [{}]:
                combo = read_only({**dict(zip(grids, values, strict=True)), **variant},
                                  self.base.get("strategy", RunSpec.strategy))
                if combo not in out:
                    out.append(combo)
        return out


def refuse_unread_mappings(sweep: SweepSpec, source: str) -> None:
    """model_args / data_args entries, fixed or searched, go to every trial: refused if a trial's
    model / data is a built-in one, which would never read them (RunSpec.refuse_unread's rule)."""
    for name, owner in OWNERS.items():
        entries = [*(sweep.base.get(name) or {}),
                   *(k.partition(".")[2] for k in [*sweep.base, *sweep.space] if k.startswith(f"{name}."))]
        owners = [v[owner] for v in sweep.variants if owner in v]  # (a variant sets no searched field)
        if owner in sweep.space:
            owners += sweep.space[owner][1]
        elif len(owners) < len(sweep.variants) or not sweep.variants:  # the base's reaches a trial
            owners.append(sweep.base.get(owner, default_of(KNOBS[owner])))
        for value in dict.fromkeys(owners):
            why = unread_mapping(name, value, entries, KNOBS[owner])
            if why:
                raise ConfigError(f"{source}: {why}")


def load_sweep(path: str | Path) -> SweepSpec:
    return SweepSpec.from_dict(load_yaml(path), source=str(path))


def is_leaf(key: str, value: Any) -> bool:
    """A search leaf, not a value: a mapping, but for the mapping knobs (model_args), whose own
    searched entries `spread` has made keys of their own."""
    return isinstance(value, dict) and key not in MAPPINGS


def spread(raw: dict[str, Any]) -> dict[str, Any]:
    """model_args: {width: {grid: [..]}, depth: 2} -> model_args: {depth: 2}, model_args.width: leaf."""
    out = dict(raw)
    for key in MAPPINGS:
        if isinstance(raw.get(key), dict):
            out[key] = {k: v for k, v in raw[key].items() if not isinstance(v, dict)}
            out.update({f"{key}.{k}": v for k, v in raw[key].items() if isinstance(v, dict)})
    return out


def parse_leaf(key: str, leaf: dict[str, Any], base: dict[str, Any], source: str) -> Leaf:
    where = f"{source}: {key}"
    names = [f.name for f in fields(RunSpec)] + [f"{m}.*" for m in MAPPINGS]
    if key not in names and key.split(".", 1)[0] not in MAPPINGS:
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
    type_ = next((f.type for f in fields(RunSpec) if f.name == key), "float")  # model_args.x: any number
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
    spec = RunSpec.from_dict({**base, key: value}, source)
    head, dot, name = key.partition(".")
    return getattr(spec, head)[name] if dot else getattr(spec, key)


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


def field_names(value: Any, where: str, source: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{source}: {where}: got {value!r}; expected a list of RunSpec fields, "
                          "e.g. [lr]")
    return value


PLAN = {"workers": 8, "bandwidth": "25Gbit/s", "latency": "10us"}


def cluster_plan(value: Any, source: str) -> dict[str, Any] | None:
    """sweep.plan: {workers, bandwidth, latency} (each defaulted), checked as `raydist plan`
    checks its flags."""
    if value is None:
        return None
    where = f"{source}: sweep.plan"
    if not isinstance(value, dict) or set(value) - set(PLAN):
        raise ConfigError(f"{where}: got {value!r}; expected a mapping of {', '.join(PLAN)}, "
                          "e.g. {workers: 8, bandwidth: 25Gbit/s}")
    plan = {**PLAN, **value}
    try:
        plan["workers"] = as_int(plan["workers"])
    except (TypeError, ValueError):
        plan["workers"] = 0
    if plan["workers"] < 2:
        raise ConfigError(f"{where}.workers: got {value.get('workers')!r}; expected an integer >= 2")
    for key, parse in (("bandwidth", parse_bandwidth), ("latency", parse_duration)):
        try:
            parse(str(plan[key]))
        except ConfigError as e:
            raise ConfigError(f"{where}.{e}") from None
    return plan


def sweep_seeds(value: Any, source: str) -> list[int]:
    bad = ConfigError(f"{source}: sweep.seeds: got {value!r}; expected an integer >= 1 (seeds "
                      "0..n-1) or a list of integers >= 0")
    try:
        seeds = list(range(as_int(value))) if not isinstance(value, list) else [as_int(v) for v in value]
    except (TypeError, ValueError):
        raise bad from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise bad
    return seeds


SWEEP_SETTINGS: dict[str, tuple[Any, Any, str]] = {
    # name: (parser, rule, what is allowed)
    "metric": (as_str, lambda v: v in SWEEP_METRICS, "one of " + ", ".join(SWEEP_METRICS)),
    "mode": (as_str, lambda v: v in ("max", "min"), "one of max, min"),
    "target": (as_float, None, "a number"),
    "samples": (as_int, at_least(1), "an integer >= 1"),
    "search": (as_str, lambda v: v in SEARCHES, "one of " + ", ".join(SEARCHES)),
    "search_seed": (as_int, at_least(0), "an integer >= 0"),
    "scheduler": (as_str, lambda v: v in SCHEDULERS, "one of " + ", ".join(SCHEDULERS)),
    "perturbation_interval": (as_int, at_least(1), "an integer >= 1"),
    "max_concurrent": (as_int, at_least(1), "an integer >= 1"),
    "scale": (as_str, lambda v: v in {f.name for f in fields(RunSpec) if f.type.startswith("int")},
              "an integer RunSpec field such as workers or stages"),
    "bound": (as_bool, None, "true or false"),
}


def sweep_settings(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """The scalar settings of the `sweep:` section; seeds, variants and perturb are parsed by
    the caller."""
    allowed = [*SWEEP_SETTINGS, "seeds", "variants", "perturb", "plan"]
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
