"""A sweep's search as Ray Tune's objects: the param space, the search algorithm (grid and
random: Tune's BasicVariantGenerator; optuna: Tune's OptunaSearch) and the scheduler (ASHA,
PBT). config/search.py holds the rules a sweep file must follow for each; here they are built.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining, TrialScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher

from raydist.config import RunSpec, SweepSpec

LEAVES: dict[str, Callable[[list[Any]], Any]] = {
    "grid": tune.grid_search,
    "choice": tune.choice,
    "loguniform": lambda v: tune.loguniform(*v),
    "uniform": lambda v: tune.uniform(*v),
}


def param_space(sweep: SweepSpec) -> dict[str, Any]:
    """The drawn leaves as Tune's samplers; the grids crossed with the variants as one grid axis
    of whole settings, each trial with only the knobs its strategy reads (SweepSpec.trial_grid).
    A sweep without grids has no such axis (Optuna refuses grid axes)."""
    space = {key: LEAVES[kind](values) for key, (kind, values) in sweep.space.items() if kind != "grid"}
    grid = sweep.trial_grid()
    if grid != [{}]:
        space["variant"] = tune.grid_search(grid)
    return space


# --- search algorithms --------------------------------------------------------------------------

def basic(sweep: SweepSpec) -> Searcher:
    # It bounds concurrency (Tune ignores max_concurrent_trials beside a search algorithm) and
    # is seeded, so the same file draws the same choice/range values every time.
    return BasicVariantGenerator(max_concurrent=sweep.max_concurrent, random_state=sweep.search_seed)


def optuna(sweep: SweepSpec) -> Searcher:
    from ray.tune.search.optuna import OptunaSearch

    # Its TPE sampler is seeded: its first draws (random until it has 10 results) repeat exactly;
    # later ones follow the results, so with max_concurrent > 1 they follow which trials end first.
    return ConcurrencyLimiter(OptunaSearch(seed=sweep.search_seed), max_concurrent=sweep.max_concurrent)


SEARCHERS: dict[str, Callable[[SweepSpec], Searcher]] = {"grid": basic, "random": basic,
                                                          "optuna": optuna}


def searcher(sweep: SweepSpec) -> Searcher:
    return SEARCHERS[sweep.search](sweep)


# --- schedulers ---------------------------------------------------------------------------------

def asha(sweep: SweepSpec) -> TrialScheduler:
    # max_t past the last epoch: a trial reaching it ends by itself, as `completed`
    return ASHAScheduler(time_attr="training_iteration", max_t=max_epochs(sweep) + 1, grace_period=1)


def pbt(sweep: SweepSpec) -> TrialScheduler:
    """Synchronous PBT: every perturbation_interval epochs the whole population waits, then
    the bottom quarter clones a top-quarter trial's checkpoint and config and perturbs the
    `perturb` fields: a grid or choice value moves to a neighbour in its list (or is redrawn
    from it, p = 0.25); a range value is multiplied by 0.8 or 1.2 (or redrawn, p = 0.25) and
    clipped to [low, high]. Synchronous, so who clones whom depends on results, not timing."""
    mutations: dict[str, Any] = {}
    bounds: dict[str, list[float]] = {}
    for name in sweep.perturb:
        kind, values = sweep.space[name]
        if kind == "grid":  # grid values travel in the trial's variant
            mutations.setdefault("variant", {})[name] = values
        elif kind == "choice":
            mutations[name] = values
        else:
            mutations[name], bounds[name] = LEAVES[kind](values), values
    random.seed(sweep.search_seed)  # PBT draws its perturbations from Python's random module
    return LastEpochKept(sweep, time_attr="training_iteration",
                         perturbation_interval=sweep.perturbation_interval,
                         hyperparam_mutations=mutations, synch=True,
                         custom_explore_fn=functools.partial(clip, bounds=bounds))


class LastEpochKept(PopulationBasedTraining):
    """PBT that leaves a trial's last epoch alone: a clone into a run that trains no further
    would only copy its donor, and pausing it there would cut the run before it saves."""

    def __init__(self, sweep: SweepSpec, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sweep = sweep

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if result.get("epoch", 0) >= self.sweep.run_spec(trial.config, "-").epochs:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def clip(config: dict[str, Any], bounds: dict[str, list[float]]) -> dict[str, Any]:
    """PBT multiplies a range value without regard to its range: kept within [low, high]."""
    for name, (low, high) in bounds.items():
        config[name] = min(max(config[name], low), high)
    return config


SCHEDULERS: dict[str, Callable[[SweepSpec], TrialScheduler]] = {
    "none": lambda sweep: FIFOScheduler(), "asha": asha, "pbt": pbt}


def scheduler(sweep: SweepSpec) -> TrialScheduler:
    return SCHEDULERS[sweep.scheduler](sweep)


def max_epochs(sweep: SweepSpec) -> int:
    values = [sweep.base.get("epochs", RunSpec.epochs)]
    values += [v["epochs"] for v in sweep.variants if "epochs" in v]
    values += sweep.space.get("epochs", ("grid", []))[1]
    return max(int(v) for v in values)
