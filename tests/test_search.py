"""Search algorithms and PBT: the sweep file's `search`, `scheduler: pbt` and `perturb`, their
one-line errors, Optuna's seeded draws, and two small sweeps on the shared Ray: Optuna's
trials run the values Optuna draws; a PBT trial clones a better one and goes on from the
donor's checkpoint with its new lr."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import yaml

from raydist import sweep
from raydist.config import ConfigError, RunSpec, load_sweep
from raydist.data import load_data
from raydist.engine import evaluate, global_batches, make_optimizer, train_epoch
from raydist.models import build_model
from raydist.sweep import search


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return str(path)


# --- the sweep file -------------------------------------------------------------------------------

@pytest.mark.unit
def test_search_defaults_to_random_when_a_leaf_is_drawn(tmp_path):
    assert load_sweep(write(tmp_path, "lr: {grid: [0.1, 0.01]}\n")).search == "grid"
    drawn = load_sweep(write(tmp_path, "lr: {loguniform: [0.001, 0.1]}\nsweep: {samples: 3}\n"))
    assert (drawn.search, drawn.samples, drawn.search_seed) == ("random", 3, 0)
    pbt = load_sweep(write(tmp_path, """
epochs: 4
lr: {grid: [0.1, 0.01]}
weight_decay: {uniform: [0.0, 0.1]}
sweep: {scheduler: pbt, perturb: [lr, weight_decay], perturbation_interval: 2, max_concurrent: 2}
"""))
    assert (pbt.search, pbt.scheduler, pbt.perturb, pbt.perturbation_interval) == (
        "random", "pbt", ["lr", "weight_decay"], 2)


PBT = "epochs: 3\nlr: {grid: [0.1, 0.01]}\nsweep: {scheduler: pbt, max_concurrent: 2, "
BAD = {
    "grid with a drawn leaf": ("lr: {uniform: [0.1, 0.2]}\nsweep: {search: grid}\n",
                               "F: lr: a uniform leaf is drawn, but sweep.search grid only crosses grid "
                               "leaves; use search random or optuna"),
    "unknown search": ("sweep: {search: bayes}\n",
                       "F: sweep.search: got 'bayes'; expected one of grid, random, optuna"),
    "bad search seed": ("sweep: {search_seed: -1}\n",
                        "F: sweep.search_seed: got -1; expected an integer >= 0"),
    "optuna without a draw": ("lr: {grid: [0.1]}\nsweep: {search: optuna}\n",
                              "F: sweep.search: optuna draws choice, loguniform or uniform leaves; this "
                              "sweep has none"),
    "optuna with a grid": ("lr: {loguniform: [0.001, 0.1]}\noptimizer: {grid: [sgd, adam]}\n"
                           "sweep: {search: optuna}\n",
                           "F: optimizer: sweep.search optuna draws every searched field itself; write "
                           "{choice: [...]} instead of {grid: [...]}"),
    "optuna with seeds": ("lr: {loguniform: [0.001, 0.1]}\nsweep: {search: optuna, seeds: 3}\n",
                          "F: sweep.seeds: sweep.search optuna draws one trial at a time; give one seed"),
    "optuna with variants": ("lr: {loguniform: [0.001, 0.1]}\n"
                             "sweep: {search: optuna, variants: [{strategy: local}]}\n",
                             "F: sweep.variants: a grid axis; sweep.search optuna takes none"),
    "optuna choosing lists": ("hidden: {choice: [[64], [32, 32]]}\nsweep: {search: optuna}\n",
                              "F: hidden: sweep.search optuna chooses among numbers, strings and booleans; "
                              "this choice holds lists"),
    "optuna under pbt": ("epochs: 3\nlr: {loguniform: [0.001, 0.1]}\n"
                         "sweep: {search: optuna, scheduler: pbt, perturb: [lr]}\n",
                         "F: sweep.scheduler: pbt makes its own configurations; it takes sweep.search grid "
                         "or random, not optuna"),
    "pbt without perturb": (PBT + "}\n",
                            "F: sweep.perturb: scheduler pbt needs the fields it perturbs, e.g. "
                            "perturb: [lr]"),
    "perturb a fixed field": (PBT + "perturb: [beta]}\n",
                              "F: sweep.perturb: 'beta' cannot change mid-run; expected fields among lr, "
                              "weight_decay"),
    "perturb an unsearched field": (PBT + "perturb: [weight_decay]}\n",
                                    "F: sweep.perturb: weight_decay is not searched; give it a leaf, e.g. "
                                    "weight_decay: {loguniform: [0.0001, 0.1]}: it draws the first values "
                                    "and bounds the perturbations"),
    "perturb not a list": (PBT + "perturb: lr}\n",
                           "F: sweep.perturb: got 'lr'; expected a list of RunSpec fields, e.g. [lr]"),
    "perturb without pbt": ("lr: {grid: [0.1, 0.01]}\nsweep: {perturb: [lr]}\n",
                            "F: sweep.perturb: read only by scheduler pbt; this sweep's scheduler is none"),
    "pbt of ddp trials": ("strategy: ddp\n" + PBT + "perturb: [lr]}\n",
                          "F: sweep.scheduler: pbt clones trials through Tune's checkpoints, which only "
                          "local trials keep; this sweep runs ddp"),
    "pbt one at a time": (PBT.replace("max_concurrent: 2", "max_concurrent: 1") + "perturb: [lr]}\n",
                          "F: sweep.max_concurrent: got 1; pbt trains its population of 2 trials side by "
                          "side; expected >= 2"),
    "pbt never perturbing": (PBT + "perturb: [lr], perturbation_interval: 3}\n",
                             "F: sweep.perturbation_interval: got 3, but trials run 3 epochs; expected < 3"),
}


@pytest.mark.unit
@pytest.mark.parametrize("text,message", BAD.values(), ids=BAD.keys())
def test_bad_search_settings(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    assert str(e.value) == message.replace("F", path, 1)


# --- Tune's objects ------------------------------------------------------------------------------

def optuna_draws(n: int, seed: int, low: float, high: float) -> list[float]:
    """What Optuna's own TPE sampler draws for `lr` (its first 10 draws are its random start)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    lr = optuna.distributions.FloatDistribution(low, high, log=True)
    return [study.ask({"lr": lr}).params["lr"] for _ in range(n)]


@pytest.mark.unit
def test_optuna_search_draws_what_optuna_draws_with_the_seed(tmp_path):
    file = ("lr: {loguniform: [0.0001, 0.1]}\n"
            "sweep: {search: optuna, samples: 4, search_seed: SEED, max_concurrent: 2}\n")

    def suggested(seed: int) -> list[float]:
        s = load_sweep(write(tmp_path, file.replace("SEED", str(seed))))
        searcher = search.searcher(s)
        searcher.set_search_properties("val_accuracy", "max", search.param_space(s))
        return [searcher.suggest(f"t{i}")["lr"] for i in range(2)]

    assert suggested(0) == pytest.approx(optuna_draws(2, 0, 1e-4, 0.1), rel=1e-12)
    assert suggested(3) == pytest.approx(optuna_draws(2, 3, 1e-4, 0.1), rel=1e-12)
    assert suggested(3) != pytest.approx(suggested(0))


@pytest.mark.unit
def test_pbt_perturbs_grids_in_the_variant_and_clips_ranges(tmp_path):
    s = load_sweep(write(tmp_path, """
epochs: 4
lr: {grid: [0.1, 0.01]}
weight_decay: {uniform: [0.0, 0.1]}
sweep: {scheduler: pbt, perturb: [lr, weight_decay], max_concurrent: 2}
"""))
    pbt = search.scheduler(s)
    assert pbt._hyperparam_mutations["variant"] == {"lr": [0.1, 0.01]}
    assert pbt._synch and pbt._perturbation_interval == 1
    clipped = pbt._custom_explore_fn({"weight_decay": 0.12, "variant": {"lr": 0.1}})
    assert clipped == {"weight_decay": 0.1, "variant": {"lr": 0.1}}

    class Trial:
        config = {"weight_decay": 0.05, "variant": {"lr": 0.1}}

    # the last epoch is left alone: never paused or cloned (a result without time_attr would
    # otherwise raise in PBT itself)
    assert pbt.on_trial_result(None, Trial(), {"epoch": 4}) == "CONTINUE"


# --- sweeps on the shared Ray -------------------------------------------------------------------

@pytest.mark.ray
def test_optuna_sweep_runs_the_values_optuna_draws(ray_local, tmp_path):
    file = write(tmp_path, """
strategy: local
epochs: 2
optimizer: adam
lr: {loguniform: [0.0001, 0.1]}
sweep: {search: optuna, samples: 3, metric: val_loss}
""")
    results = sweep.run(file, tmp_path / "out")
    trials = results.drop_duplicates("trial_id")
    assert trials["status"].tolist() == ["completed"] * 3
    assert results.groupby("trial_id")["epoch"].apply(list).map(tuple).unique().tolist() == [(1, 2)]
    lrs = sorted(trials["lr"])
    assert len(set(lrs)) == 3 and all(1e-4 <= lr <= 0.1 for lr in lrs)
    assert lrs == pytest.approx(sorted(optuna_draws(3, 0, 1e-4, 0.1)), rel=1e-9)


def replay(spec_file: Path, state: dict, lr: float, epoch: int) -> float:
    """val_loss after `epoch` trained from a checkpoint's model and optimizer at `lr`: the
    engine's own step, restored by hand."""
    spec = RunSpec.from_dict({**yaml.safe_load(spec_file.read_text()), "lr": lr})
    data = load_data(spec)
    model = build_model(spec, data)
    model.load_state_dict(state["model"])
    optimizer = make_optimizer(spec, model.parameters())
    optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:
        group["lr"] = lr
    torch.set_num_threads(1)
    train_epoch(model, optimizer, data, global_batches(spec, data, epoch))
    return evaluate(model, data)["val_loss"]


@pytest.mark.ray
def test_pbt_clones_the_better_trial_and_goes_on_from_its_checkpoint(ray_local, tmp_path):
    # lr 1e-6 barely moves: after epoch 1 it is the bottom of the two and clones the other one
    file = write(tmp_path, """
strategy: local
epochs: 2
optimizer: adam
lr: {grid: [0.01, 0.000001]}
sweep: {scheduler: pbt, perturb: [lr], max_concurrent: 2, metric: val_loss}
""")
    out = tmp_path / "out"
    results = sweep.run(file, out)
    trials = results.drop_duplicates("trial_id").set_index("trial_id")
    assert (trials["status"] == "completed").all() and len(trials) == 2
    # Tune's own log of PBT's exploits, one line each, against the results' count
    logged = (out / "tune" / "pbt_global.txt").read_text().splitlines()
    assert trials["exploits"].sum() == len(logged) >= 1
    [folder] = (out / "tune").glob("trial_*_variant=lr_1e-06_*")  # Tune names it by its first config
    slow = folder.name.split("_")[1] + "_" + folder.name.split("_")[2]
    fast = next(t for t in trials.index if t != slow)
    exploits = pd.read_csv(out / "trials" / slow / "exploits.csv")
    first = exploits.iloc[0]
    assert (first.after_epoch, first.donor) == (1, fast)
    assert trials.loc[slow, "cloned_from"].split(",")[0] == fast
    assert results[results["trial_id"] == slow].set_index("epoch").loc[1, "trained_by"] == fast
    assert first.lr in (0.01, 1e-6)  # a neighbour on the grid (or the donor's own value)
    # After a trial's last clone, its epochs are its own and go on from the donor's checkpoint
    # (Tune keeps every one) at the clone's new lr.
    states = [torch.load(p, weights_only=False) for p in (out / "tune").rglob("state.pt")]
    for t in trials.index[trials["exploits"] > 0]:
        last = pd.read_csv(out / "trials" / t / "exploits.csv").iloc[-1]
        k = int(last.after_epoch)
        rows = results[results["trial_id"] == t].set_index("epoch")
        assert (rows.loc[k + 1, "trained_by"], rows.loc[k + 1, "lr"]) == (t, last.lr)
        [donor] = [s for s in states if s["trial_id"] == last.donor and len(s["rows"]) == k]
        assert rows.loc[k, "val_loss"] == donor["rows"][-1]["val_loss"]
        assert rows.loc[k + 1, "val_loss"] == pytest.approx(
            replay(out / "trials" / t / "spec.yaml", donor, last.lr, k + 1), abs=1e-6)
    for t in trials.index:
        assert (out / "trials" / t / "model.pt").exists()


@pytest.mark.unit
def test_a_pbt_clone_keeps_the_donors_place_in_the_schedule_at_its_own_lr():
    """Donor at lr 0.1, warmup 4 (step s's factor is (s+1)/5), two steps in; the clone's lr is
    0.2 with batch 128 and linear scaling from base 64: 0.4 at full warmup."""
    from raydist.engine import make_scheduler
    from raydist.sweep import pbt

    def run(lr: float):
        spec = RunSpec.from_dict({"lr": lr, "warmup_steps": 4, "batch_size": 128, "lr_scaling": "linear",
                                  "base_batch": 64, "optimizer": "sgd"})
        optimizer = make_optimizer(spec, [torch.nn.Parameter(torch.zeros(2))])
        return spec, optimizer, make_scheduler(spec, optimizer, 100)

    _, donor_opt, donor = run(0.1)
    for _ in range(2):
        donor_opt.step()
        donor.step()
    spec, opt, clone = run(0.2)
    opt.load_state_dict(donor_opt.state_dict())
    clone.load_state_dict(donor.state_dict())
    pbt.take_config(clone, spec)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4 * 3 / 5)
    opt.step()
    clone.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4 * 4 / 5)
