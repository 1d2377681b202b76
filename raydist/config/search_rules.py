"""What each search algorithm and scheduler takes of a sweep file, checked once when it loads.

- `grid` crosses the grid leaves (and variants, seeds); it draws nothing.
- `random` draws the choice/range leaves `samples` times, each draw crossed with every grid.
- `optuna` lets Optuna's TPE sampler draw `samples` trials from the choice/range leaves; it
  learns from the finished ones, so it takes no grid, variants or several seeds.
- scheduler `pbt` perturbs the fields in `perturb` mid-run within their leaves' bounds; its
  trials are local runs cloned through Tune's checkpoints, trained side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from raydist.config.run import RunSpec
from raydist.errors import ConfigError

if TYPE_CHECKING:
    from raydist.config.sweep_file import SweepSpec

SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("none", "asha", "pbt")
PERTURBABLE = ("lr", "weight_decay")
"""Fields a PBT trial may change mid-run: each is a key of every optimizer's param groups."""
DRAWN = ("choice", "loguniform", "uniform")


def check_search(sweep: SweepSpec, given: dict[str, Any], source: str) -> None:
    """Fill in the default search (random when something is drawn, else grid) and apply the
    search's and the scheduler's rules; every failure is one ConfigError naming the field."""
    drawn = [k for k, (kind, _) in sweep.space.items() if kind in DRAWN]
    if "search" not in given:
        sweep.search = "random" if drawn else "grid"
    RULES[sweep.search](sweep, drawn, f"{source}: ")
    if sweep.scheduler == "pbt":
        check_pbt(sweep, f"{source}: ")
    elif sweep.perturb:
        raise ConfigError(f"{source}: sweep.perturb: read only by scheduler pbt; this sweep's "
                          f"scheduler is {sweep.scheduler}")


def check_grid(sweep: SweepSpec, drawn: list[str], where: str) -> None:
    if drawn:
        kind = sweep.space[drawn[0]][0]
        raise ConfigError(f"{where}{drawn[0]}: a {kind} leaf is drawn, but sweep.search grid only "
                          "crosses grid leaves; use search random or optuna")


def check_optuna(sweep: SweepSpec, drawn: list[str], where: str) -> None:
    if not drawn:
        raise ConfigError(f"{where}sweep.search: optuna draws choice, loguniform or uniform leaves; "
                          "this sweep has none")
    grids = [k for k, (kind, values) in sweep.space.items() if kind == "grid" and k != "seed"]
    if grids:
        raise ConfigError(f"{where}{grids[0]}: sweep.search optuna draws every searched field "
                          "itself; write {choice: [...]} instead of {grid: [...]}")
    if len(sweep.space.get("seed", ("grid", [0]))[1]) > 1:
        raise ConfigError(f"{where}sweep.seeds: sweep.search optuna draws one trial at a time; "
                          "give one seed")
    if sweep.variants:
        raise ConfigError(f"{where}sweep.variants: a grid axis; sweep.search optuna takes none")
    for key in drawn:
        kind, values = sweep.space[key]
        if kind == "choice" and not all(isinstance(v, str | int | float | bool) for v in values):
            raise ConfigError(f"{where}{key}: sweep.search optuna chooses among numbers, strings "
                              "and booleans; this choice holds lists")
    if sweep.scheduler == "pbt":
        raise ConfigError(f"{where}sweep.scheduler: pbt makes its own configurations; it takes "
                          "sweep.search grid or random, not optuna")


RULES: dict[str, Callable[[SweepSpec, list[str], str], None]] = {
    "grid": check_grid,
    "random": lambda sweep, drawn, where: None,
    "optuna": check_optuna,
}


def check_pbt(sweep: SweepSpec, where: str) -> None:
    if not sweep.perturb:
        raise ConfigError(f"{where}sweep.perturb: scheduler pbt needs the fields it perturbs, "
                          "e.g. perturb: [lr]")
    for name in sweep.perturb:
        if name not in PERTURBABLE:
            raise ConfigError(f"{where}sweep.perturb: '{name}' cannot change mid-run; expected "
                              f"fields among {', '.join(PERTURBABLE)}")
        if name not in sweep.space:
            raise ConfigError(f"{where}sweep.perturb: {name} is not searched; give it a leaf, e.g. "
                              f"{name}: {{loguniform: [0.0001, 0.1]}}: it draws the first values "
                              "and bounds the perturbations")
    others = sorted(set(trial_strategies(sweep)) - {"local"})
    if others:
        raise ConfigError(f"{where}sweep.scheduler: pbt clones trials through Tune's checkpoints, "
                          f"which only local trials keep; this sweep runs {', '.join(others)}")
    trials = sweep.samples * len(sweep.trial_grid())
    if sweep.max_concurrent < trials:
        raise ConfigError(f"{where}sweep.max_concurrent: got {sweep.max_concurrent}; pbt trains its "
                          f"population of {trials} trials side by side; expected >= {trials}")
    epochs = max(trial_values(sweep, "epochs", RunSpec.epochs))
    if sweep.perturbation_interval >= epochs:
        raise ConfigError(f"{where}sweep.perturbation_interval: got {sweep.perturbation_interval}, "
                          f"but trials run {epochs} epochs; expected < {epochs}")


def trial_strategies(sweep: SweepSpec) -> list[str]:
    return trial_values(sweep, "strategy", RunSpec.strategy)


def trial_values(sweep: SweepSpec, key: str, default: Any) -> list[Any]:
    """Every value `key` takes in the sweep's trials: fixed, searched or in a variant."""
    values = list(sweep.space[key][1]) if key in sweep.space else [sweep.base.get(key, default)]
    return values + [v[key] for v in sweep.variants if key in v]
