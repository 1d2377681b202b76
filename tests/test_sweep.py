"""`raydist sweep`: the sweep file's search space and its errors, a sweep of local and 2-worker
ddp trials on the shared Ray (no deadlock, diverged trials marked, results tables), early
stopping by ASHA, and resuming an interrupted sweep without rerunning finished trials."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raydist import sweep
from raydist.cli import main
from raydist.config import ConfigError, SweepSpec, load_sweep
from raydist.plan import machine_bound as bound
from raydist.strategies import STRATEGIES

CONFIGS = Path(__file__).resolve().parents[1] / "tune_configs"
SIX = ["gd", "sgd", "momentum", "adagrad", "rmsprop", "adam"]


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- the search space ----------------------------------------------------------------------------

@pytest.mark.unit
def test_parse_leaves_seeds_variants_and_settings(tmp_path):
    s = load_sweep(write(tmp_path, """
epochs: 2
optimizer: {grid: [sgd, adam]}
lr: {loguniform: [0.001, 0.1]}
beta: {uniform: [0.5, 0.9]}
hidden: {choice: [[64], [64, 32]]}
sweep: {metric: val_loss, target: 0.3, samples: 2, seeds: 3, scheduler: asha, max_concurrent: 2,
        variants: [{strategy: local}, {strategy: ddp, workers: 2}]}
"""))
    assert s.base == {"epochs": 2}
    assert s.space == {"optimizer": ("grid", ["sgd", "adam"]), "lr": ("loguniform", [0.001, 0.1]),
                       "beta": ("uniform", [0.5, 0.9]), "hidden": ("choice", [[64], [64, 32]]),
                       "seed": ("grid", [0, 1, 2])}
    assert s.variants == [{"strategy": "local"}, {"strategy": "ddp", "workers": 2}]
    assert (s.metric, s.mode, s.target, s.samples, s.scheduler, s.max_concurrent, s.scale) == (
        "val_loss", "min", 0.3, 2, "asha", 2, "workers")  # a loss is minimised by default
    assert sweep.total_trials(s) == 2 * 2 * 3 * 2  # samples x optimizer grid x seeds x variants
    spec = s.run_spec({"optimizer": "sgd", "lr": 0.01, "beta": 0.7, "hidden": [64, 32], "seed": 1,
                       "variant": s.variants[1]}, "/tmp/t")
    assert (spec.strategy, spec.workers, spec.optimizer, spec.lr, spec.hidden, spec.seed, spec.epochs,
            spec.out) == ("ddp", 2, "sgd", 0.01, [64, 32], 1, 2, "/tmp/t")


BAD = {
    "unknown leaf kind": ("lr: {logunifrom: [0.001, 0.1]}\n",
                          "F: lr: unknown search kind 'logunifrom' (did you mean 'loguniform'?); "
                          "expected one of grid, choice, loguniform, uniform"),
    "two kinds in a leaf": ("lr: {grid: [0.1], choice: [0.2]}\n",
                            "F: lr: a search leaf has exactly one key, one of grid, choice, loguniform, "
                            "uniform"),
    "empty grid": ("optimizer: {grid: []}\n", "F: optimizer: grid expects a non-empty list of values"),
    "bad key in the sweep": ("optimiser: {grid: [sgd]}\n",
                             "F: unknown key 'optimiser' (did you mean 'optimizer'?)"),
    "bad fixed key": ("epoch: 3\n", "F: unknown key 'epoch' (did you mean 'epochs'?)"),
    "bad value in a grid": ("lr: {grid: [0.1, -1]}\n", "F: lr: got -1.0; expected a number > 0"),
    "unknown name in a grid": ("optimizer: {choice: [sgd, adamm]}\n",
                               "F: optimizer: unknown value 'adamm' (did you mean 'adam'?); expected one "
                               "of gd, sgd, momentum, adagrad, rmsprop, adam, adamw, lars, muon, lamb, "
                               "adafactor, lion, schedule-free-adamw"),
    "range of an int field": ("epochs: {uniform: [1, 5]}\n",
                              "F: epochs: uniform draws real numbers, but epochs is not a number field; "
                              "use grid or choice"),
    "reversed range": ("lr: {loguniform: [0.1, 0.001]}\n",
                       "F: lr: loguniform expects [low, high] with 0 < low < high; got [0.1, 0.001]"),
    "range of three": ("lr: {uniform: [0.1, 0.2, 0.3]}\n",
                       "F: lr: uniform expects [low, high] with low < high"),
    "out in the file": ("out: results/x\n",
                        "F: out: set by the sweep for each trial (DIR/trials/<trial-id>); remove it"),
    "seed and seeds": ("seed: 1\nsweep: {seeds: 2}\n",
                       "F: seed: also set by sweep.seeds; keep one of the two"),
    "bad scheduler": ("sweep: {scheduler: hyperband}\n",
                      "F: sweep.scheduler: got 'hyperband'; expected one of none, asha, pbt"),
    "zero concurrency": ("sweep: {max_concurrent: 0}\n",
                         "F: sweep.max_concurrent: got 0; expected an integer >= 1"),
    "bad metric": ("sweep: {metric: accuracy}\n",
                   "F: sweep.metric: got 'accuracy'; expected one of val_accuracy, val_loss, train_loss"),
    "bad mode": ("sweep: {mode: up}\n", "F: sweep.mode: got 'up'; expected one of max, min"),
    "target not a number": ("sweep: {target: high}\n", "F: sweep.target: got 'high'; expected a number"),
    "samples not an int": ("sweep: {samples: 1.5}\n", "F: sweep.samples: got 1.5; expected an integer >= 1"),
    "bad seeds": ("sweep: {seeds: [0, -1]}\n",
                  "F: sweep.seeds: got [0, -1]; expected an integer >= 1 (seeds 0..n-1) or a list of "
                  "integers >= 0"),
    "bad scale": ("sweep: {scale: lr}\n",
                  "F: sweep.scale: got 'lr'; expected an integer RunSpec field such as workers or stages"),
    "unknown sweep key": ("sweep: {max_concurent: 2}\n",
                          "F: sweep: unknown key 'max_concurent' (did you mean 'max_concurrent'?); expected "
                          "one of metric, mode, target, samples, search, search_seed, scheduler, "
                          "perturbation_interval, max_concurrent, scale, bound, seeds, variants, perturb, "
                          "plan"),
    "bound not a bool": ("sweep: {bound: maybe}\n", "F: sweep.bound: got 'maybe'; expected true or false"),
    "plan not a mapping": ("sweep: {plan: 8}\n",
                           "F: sweep.plan: got 8; expected a mapping of workers, bandwidth, latency, "
                           "e.g. {workers: 8, bandwidth: 25Gbit/s}"),
    "plan of one worker": ("sweep: {plan: {workers: 1}}\n",
                           "F: sweep.plan.workers: got 1; expected an integer >= 2"),
    "plan bandwidth": ("sweep: {plan: {bandwidth: fast}}\n",
                       "F: sweep.plan.bandwidth: got 'fast'; expected a rate like 25Gbit/s or 3GB/s"),
    "sweep not a mapping": ("sweep: [1]\n", "F: sweep: expected a mapping of setting: value"),
    "variant sets a searched key": ("workers: {grid: [1, 2]}\nsweep: {variants: [{workers: 4}]}\n",
                                    "F: sweep.variants: workers is searched or set per trial; a variant "
                                    "holds plain values of other fields"),
    "bad value in a variant": ("sweep: {variants: [{strategy: dpp}]}\n",
                               "F: strategy: unknown value 'dpp' (did you mean 'ddp'?); expected one of "
                               + ", ".join(STRATEGIES.names())),
}


@pytest.mark.unit
@pytest.mark.parametrize("text,message", BAD.values(), ids=BAD.keys())
def test_bad_sweep_files(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    assert str(e.value) == message.replace("F", path, 1)


@pytest.mark.unit
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_files_parse(path):
    s = load_sweep(path)
    names = {v.get("strategy", s.base.get("strategy")) for v in s.variants} or {s.base.get("strategy")}
    assert names <= set(STRATEGIES.names())
    assert sweep.total_trials(s) >= 4


@pytest.mark.unit
def test_quickstart_is_the_six_optimizers_on_local_and_adam_on_ddp():
    """The main job: six optimizers on local, adam on 1 and 2 ddp workers, the machine's bound
    and the plan for 8 workers on 25 Gbit/s beside the speedup."""
    s = load_sweep(CONFIGS / "quickstart.yaml")
    assert s.variants == [*({"strategy": "local", "optimizer": o} for o in SIX),
                          {"strategy": "ddp", "workers": 1, "optimizer": "adam"},
                          {"strategy": "ddp", "workers": 2, "optimizer": "adam"}]
    assert (s.base["data"], sweep.total_trials(s), s.max_concurrent) == ("digits", 8, 1)
    assert s.bound and s.plan == {"workers": 8, "bandwidth": "25Gbit/s", "latency": "10us"}
    scaled, counts = bound.wanted(sweep.trial_specs(s))
    assert [spec.optimizer for spec in scaled] == ["adam"] and counts == [1, 2]


@pytest.mark.unit
def test_optimizers_sweep_follows_the_protocol():
    s = load_sweep(CONFIGS / "optimizers.yaml")
    kind, lrs = s.space["lr"]
    assert s.space["optimizer"] == ("grid", SIX) and kind == "grid" and len(lrs) >= 5
    assert len(s.space["seed"][1]) >= 3 and s.target is not None


@pytest.mark.unit
def test_cli_usage_errors(tmp_path, capsys):
    file = write(tmp_path, "epochs: 1\n", "s.yaml")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "sweep.yaml").write_text("epochs: 1\n")
    usage = "error: sweep: give a sweep FILE (with --out DIR) or --resume DIR"
    cases = [
        (["sweep"], usage),
        (["sweep", file, "--resume", "x"], usage),
        (["sweep", file, "--out", str(tmp_path / "done")],
         f"error: {tmp_path / 'done'}: already holds a sweep; continue it with `raydist sweep --resume "
         f"{tmp_path / 'done'}` or choose another --out"),
        (["sweep", "--resume", str(tmp_path / "none")],
         f"error: {tmp_path / 'none'}: no sweep to resume (no sweep.yaml); start one with "
         f"`raydist sweep FILE --out {tmp_path / 'none'}`"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == message


@pytest.mark.unit
def test_connect_refuses_a_cluster_without_trial_drivers(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    with pytest.raises(ConfigError, match="^the Ray cluster has no 'trial_driver' resource"):
        with sweep.ray_for(SweepSpec({}, {}), None):
            pass


# --- sweeps on the shared Ray --------------------------------------------------------------------

def trial_table(results: pd.DataFrame) -> pd.DataFrame:
    return results.drop_duplicates("trial_id").set_index("trial_id")


# Two 2-worker ddp trials may run at once beside the local ones: 4 CPUs hold them, and the trial
# drivers take none. The ddp sgd trial's lr turns its loss NaN in the first epoch: ddp's own
# divergence check (tests/test_ddp.py would need a Ray Train fit of its own for it) shares this
# sweep's fit. max_failures 2: a diverged run is not a failure for Ray Train to retry. The ps
# and pipeline trials start their actors outside the trial's placement group (it holds only
# the trial's driver): started inside it, they could never be placed. The adam setting runs on
# 1 and 2 workers: the sweep measures its bound and predicts it on 4 workers of a cluster.
SWEEP = """
epochs: 2
sweep:
  max_concurrent: 2
  bound: true
  plan: {workers: 4, bandwidth: 10Gbit/s}
  variants:
    - {strategy: local, optimizer: adam}
    - {strategy: ddp, workers: 2, optimizer: adam}
    - {strategy: ddp, workers: 2, optimizer: sgd, lr: 1.0e+20, max_failures: 2}
    - {strategy: local, optimizer: adam, model: cnn, data: synthetic}
    - {strategy: ps, workers: 2, mode: sync, optimizer: adam}
    - {strategy: pipeline, stages: 2, optimizer: adam}
"""


@pytest.fixture(scope="module")
def swept(ray_local, tmp_path_factory):
    """The sweep above: what sweep.run returned, results.csv, and the sweep's folder."""
    out = tmp_path_factory.mktemp("swept") / "out"
    results = sweep.run(write(out.parent, SWEEP), out)
    return results, pd.read_csv(out / "results.csv"), out


@pytest.mark.ray
def test_sweep_with_two_worker_trials_and_a_diverged_one(swept):
    results, on_disk, out = swept
    shared = ["trial_id", "status", "epoch", "val_loss", "strategy", "workers", "optimizer", "lr", "out"]
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet")[shared], on_disk[shared])
    trials = trial_table(on_disk)
    assert len(trials) == 6 and len(results) == len(on_disk)
    failed = trials[trials["model"] == "cnn"].iloc[0]  # a combination only the run itself refuses
    assert (failed.status, failed.message) == (
        "error", "model: 'cnn' cannot take data 'synthetic' (features); it takes image")
    trials = trials[trials["model"] == "mlp"]
    by_setting = {(t.strategy, t.optimizer): t for t in trials.itertuples()}
    assert sorted(by_setting) == [("ddp", "adam"), ("ddp", "sgd"), ("local", "adam"), ("pipeline", "adam"),
                                  ("ps", "adam")]
    diverged = by_setting[("ddp", "sgd")]
    assert (diverged.status, diverged.message, diverged.lr) == (
        "diverged", "training loss is nan at epoch 1", 1e20)
    for key in [("ddp", "adam"), ("local", "adam"), ("ps", "adam"), ("pipeline", "adam")]:
        assert by_setting[key].status == "completed"
    assert by_setting[("ddp", "adam")].workers == 2 and by_setting[("local", "adam")].workers == 1
    # one row per trial per epoch; the diverged trial stops after the epoch that diverged
    epochs = on_disk.groupby("trial_id", dropna=False)["epoch"].apply(list).to_dict()
    assert {t: e for t, e in epochs.items() if t in trials.index} == {
        t.Index: ([1] if t.status == "diverged" else [1, 2]) for t in trials.itertuples()}
    assert math.isnan(epochs[failed.name][0]) and len(epochs[failed.name]) == 1
    # the trial ran its spec: ddp, ps and pipeline follow local to round-off
    runs = {k: on_disk[on_disk["trial_id"] == by_setting[k].Index] for k in by_setting}
    for name in ("ddp", "ps", "pipeline"):
        assert runs[(name, "adam")]["val_loss"].values == pytest.approx(
            runs[("local", "adam")]["val_loss"].values, abs=1e-5), name
    for trial_id, t in trials.iterrows():
        folder = out / "trials" / trial_id
        assert t.out == str(folder)
        assert yaml.safe_load((folder / "spec.yaml").read_text())["strategy"] == t.strategy
        assert (folder / "model.pt").exists() == (t.status == "completed")


@pytest.mark.ray
def test_bound_and_cluster_plan_beside_the_trials(swept):
    """The one setting run at 1 and 2 workers (adam) gets its bound, 1 and 2 bare actors, and a
    plan for 4 workers; the report sets them beside the measured speedup."""
    _, _, out = swept
    measured = pd.read_csv(out / "bound.csv")
    assert measured[["optimizer", "workers"]].values.tolist() == [["adam", 1], ["adam", 2]]
    assert (measured["samples_per_s"] > 0).all()
    plan = pd.read_csv(out / "plan" / "plan.csv")
    assert plan[plan["strategy"] == "ddp"]["workers"].tolist() == [1, 2, 4]
    assert main(["report", str(out)]) == 0
    text = (out / "report.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| strategy |"))
    assert "| efficiency | bound_samples_per_s | efficiency_vs_bound | vs_local |" in header
    assert "- ddp on 2 workers: " in text and "- pipeline" not in text
    # the report names the strategy plan.csv predicts fastest at its most workers (the plan's
    # own rows, the report's input), not a strategy the report would name by itself
    most = plan[plan["workers"] == 4].dropna(subset=["step_s"])
    fastest = most.loc[most["step_s"].idxmin(), "strategy"]
    assert f"10Gbit/s links, 10us latency): {fastest}, the fastest it predicts there, on 4 workers" in text


@pytest.mark.ray
def test_ddp_divergence_raises_in_the_caller(swept):
    """ddp's workers stop at the NaN epoch and the driver raises Diverged in the thread that
    called `train` (the trial's), after reporting that epoch once with its NaN loss. Ray Train
    may restart twice but must not: were the divergence a worker failure, it would retry it and
    the trial would end in an error, not `diverged`."""
    _, on_disk, out = swept
    [trial_id] = on_disk[on_disk["lr"] == 1e20]["trial_id"].unique()
    rows = on_disk[on_disk["trial_id"] == trial_id]
    assert (rows["strategy"].tolist(), rows["workers"].tolist(), rows["max_failures"].tolist()) == (
        ["ddp"], [2], [2])
    assert (rows["status"].tolist(), rows["message"].tolist()) == (
        ["diverged"], ["training loss is nan at epoch 1"])
    assert rows["epoch"].tolist() == [1] and math.isnan(rows["train_loss"].iloc[0])
    assert not (out / "trials" / trial_id / "model.pt").exists()
    # the diverged epoch was never checkpointed (Ray Train's checkpoints are folders)
    assert [p for p in (out / "trials" / trial_id / "ray").rglob("checkpoint_*") if p.is_dir()] == []


@pytest.mark.ray
def test_asha_stops_a_bad_trial_early(ray_local, tmp_path):
    # One trial at a time: the second reaches ASHA's first rung below the first one and stops.
    file = write(tmp_path, """
strategy: local
optimizer: adam
epochs: 4
lr: {grid: [0.01, 1.0e-7]}
sweep: {scheduler: asha, max_concurrent: 1}
""")
    trials = trial_table(sweep.run(file, tmp_path / "out"))
    good, bad = trials.sort_values("lr", ascending=False).itertuples()
    assert (good.status, bad.status) == ("completed", "stopped")
    assert bad.message == "stopped early by the scheduler"
    epochs = pd.read_csv(tmp_path / "out" / "results.csv").groupby("trial_id")["epoch"].max()
    assert (epochs[good.Index], epochs[bad.Index]) == (4, 1)


def interrupt_after_first_completed(trials: Path) -> threading.Thread:
    """Like Ctrl-C once the first trial has finished: Tune saves its state and returns."""

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(sweep.get_state(d)["status"] == "completed" for d in trials.glob("*")):
                os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own "stop and save" signal
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.ray
def test_resume_continues_without_rerunning_finished_trials(ray_local, tmp_path, capsys):
    file = write(tmp_path, """
strategy: local
epochs: 2
optimizer: {grid: [sgd, adagrad, adam]}
sweep: {max_concurrent: 1}
""")
    out = tmp_path / "out"
    watcher = interrupt_after_first_completed(out / "trials")
    first_rows = sweep.run(file, out)
    first = trial_table(first_rows)
    watcher.join(5)
    assert f"sweep: interrupted; continue it with `raydist sweep --resume {out}`" in capsys.readouterr().out
    finished = first[first["status"] == "completed"].index.tolist()
    assert 1 <= len(finished) < 3  # the sweep was cut short
    stamps = {t: (out / "trials" / t / "model.pt").stat().st_mtime_ns for t in finished}

    assert main(["sweep", "--resume", str(out)]) == 0
    results = pd.read_csv(out / "results.csv")
    trials = trial_table(results)
    assert sorted(trials["optimizer"]) == ["adagrad", "adam", "sgd"]
    assert (trials["status"] == "completed").all()
    assert {t: (out / "trials" / t / "model.pt").stat().st_mtime_ns for t in finished} == stamps
    kept = results[results["trial_id"].isin(finished)].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, first_rows[first_rows["trial_id"].isin(finished)]
                                  .reset_index(drop=True))  # the rows from before the interruption
    assert results.groupby("trial_id")["epoch"].apply(list).map(tuple).unique().tolist() == [(1, 2)]


@pytest.mark.unit
def test_job_entrypoint_runs_the_sweep_then_its_report(monkeypatch):
    import importlib.util

    from raydist import report

    calls = []
    monkeypatch.setattr(sweep, "run", lambda file, out, address: calls.append(("sweep", file, out, address)))
    monkeypatch.setattr(report, "write",
                        lambda folder, plan=None: calls.append(("report", folder, plan)) or "r.md")
    spec = importlib.util.spec_from_file_location("job", CONFIGS.parent / "jobs" / "sweep.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(["tune_configs/scaling.yaml", "--address", "auto"]) == 0
    assert calls == [("sweep", "tune_configs/scaling.yaml", "results/scaling", "auto"),
                     ("report", "results/scaling", None)]
