"""`raydist sweep`: a sweep file turned into a Ray Tune search. One trial is one RunSpec run by
`raydist.train`, reporting every epoch to Tune; the sweep never looks inside a strategy.

Each trial is a function trainable holding {"cpu": 0, "trial_driver": 1}: the trial's driver
takes no CPU from the workers its strategy starts (a 2-worker ddp trial fits on 2 CPUs), and
`max_concurrent` bounds how many trials run at once, so trials never wait on each other's
workers (docs/ray-notes.md, "Ray Tune with Ray Train V2").

DIR/
  sweep.yaml                      the sweep file as given: what --resume and the report read
  tune/                           Tune's experiment state, continued by Tuner.restore
  trials/<trial-id>/              the trial's RunSpec.out, plus trial.yaml (status) and epochs.csv
  results.csv, results.parquet    one row per trial per epoch, with the trial's full spec
  bound.csv                       `bound: true`: the machine's compute-only bound (plan/machine_bound.py)
  plan/                           `plan:`: `raydist plan` for the scaled setting on a cluster
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import yaml
from ray import tune

from raydist import strategies, tracking
from raydist.config import ConfigError, RunSpec, SweepSpec, load_sweep
from raydist.engine import Diverged, Record, check_out
from raydist.engine.progress import SweepLine
from raydist.engine.record import scalars
from raydist.errors import Stalled
from raydist.plan import machine_bound as bound
from raydist.plan.machine_bound import flat
from raydist.runtime import connect, interrupts, logs
from raydist.sweep import pbt, search
from raydist.train import train

# A trial that ends before its first epoch (a refused setting) reports no metric: without this,
# Tune's strict metric check would end the whole sweep over it.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")

TRIAL_RESOURCES = {"cpu": 0, "trial_driver": 1}
STATE, EPOCHS = "trial.yaml", "epochs.csv"
# A status the trial sets itself is final; the driver only marks trials the scheduler stopped.
FINAL = ("completed", "diverged", "error")

# --- entry points ------------------------------------------------------------------------------

def run(file: str | Path, out: str | Path, address: str | None = None) -> pd.DataFrame:
    """Run the sweep in `file`; results land in `out`. Returns the results table."""
    root = Path(out).resolve()
    if (root / "sweep.yaml").exists():
        raise ConfigError(f"{out}: already holds a sweep; continue it with `raydist sweep --resume "
                          f"{out}` or choose another --out")
    sweep = load_sweep(file)
    connect.reachable(*cluster_of(sweep, address))  # before the folder is made
    check_out(str(out))
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(file, root / "sweep.yaml")
    return execute(sweep, root, address, restore=False)


def resume(out: str | Path, address: str | None = None) -> pd.DataFrame:
    """Continue an interrupted sweep: finished trials stay as they are, the rest run."""
    root = Path(out).resolve()
    if not (root / "sweep.yaml").is_file():
        raise ConfigError(f"{out}: no sweep to resume (no sweep.yaml); start one with "
                          f"`raydist sweep FILE --out {out}`")
    sweep = load_sweep(root / "sweep.yaml")
    connect.reachable(*cluster_of(sweep, address))
    return execute(sweep, root, address, restore=tune.Tuner.can_restore(str(root / "tune")))


def execute(sweep: SweepSpec, root: Path, address: str | None, restore: bool) -> pd.DataFrame:
    """Ray's and Tune's own messages go to DIR/ray.log. Ctrl-C (or SIGTERM) during the fit:
    Tune stops the trials and saves its state, and the results so far are collected."""
    with ray_for(sweep, address), logs.ray_log(root / logs.RAY_LOG):
        trainable = tune.with_resources(make_trial(sweep, root, os.getcwd()), TRIAL_RESOURCES)
        if restore:
            tuner = tune.Tuner.restore(str(root / "tune"), trainable, resume_unfinished=True)
        else:
            tuner = tune.Tuner(trainable, param_space=search.param_space(sweep),
                               tune_config=tune_config(sweep), run_config=run_config(sweep, root))
        print(f"sweep: {total_trials(sweep)} trials, at most {sweep.max_concurrent} at a time; "
              f"results in {root}", flush=True)
        with interrupts.sigterm_as_sigint():
            tuner.fit()
            if finished(root, total_trials(sweep)):
                measure_machine(sweep, root)
    results = collect(root)
    results.attrs["interrupted"] = summarize(results, total_trials(sweep), root)
    return results


@contextmanager
def ray_for(sweep: SweepSpec, address: str | None) -> Iterator[None]:
    """connect.connect's rule (the Ray already started, --address, the file's address,
    RAY_ADDRESS, the local Ray `raydist ray start` keeps, else an embedded one), plus the
    trial_driver resource every trial holds. A Ray started (or joined) here is shut down (left)
    on the way out."""
    if ray.is_initialized():
        require_trial_drivers()
        yield
        return
    address, field = cluster_of(sweep, address)
    saved = os.environ.get(connect.API_SERVER)
    try:
        if address and address != "local":
            connect.join(address, field)  # bounded: nothing answering is one line
        elif address != "local" and connect.join_local_head():  # `raydist ray start`'s
            pass
        else:  # ASHA stops trials early: Ray Train must be able to free their workers
            connect.start_local(num_cpus=connect.embedded_cpus(*hungriest_trial(sweep)),
                                resources={"trial_driver": sweep.max_concurrent}, log_to_driver=False)
        require_trial_drivers()
        yield
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop(connect.API_SERVER, None)
        else:
            os.environ[connect.API_SERVER] = saved


def cluster_of(sweep: SweepSpec, address: str | None) -> tuple[str | None, str]:
    """The cluster a sweep joins and the field naming it: --address, the file's address,
    RAY_ADDRESS (connect.cluster_address: a malformed one is refused before any work)."""
    return connect.cluster_address(address or sweep.base.get("address"))


def hungriest_trial(sweep: SweepSpec) -> tuple[float, str]:
    """The CPUs the most demanding trial asks for, and what it is: an embedded Ray offers at
    least that, so no trial is refused on a laptop (trials beyond it wait for each other).
    Grid leaves and variants count; a drawn leaf counts at its base value; a trial whose
    setting is refused is left to fail as its own trial."""
    most: tuple[float, str] = (0.0, "the sweep")
    for spec in trial_specs(sweep):
        resources = strategies.get(spec.strategy).resources
        if resources is not None:
            cpus, _, what = resources(spec, 0.0)
            most = max(most, (cpus, f"a trial ({what})"), key=lambda m: m[0])
    return most


def trial_specs(sweep: SweepSpec) -> list[RunSpec]:
    """The spec of every grid leaf and variant (a drawn leaf at its base value); a setting the
    config refuses is left out (it fails as its own trial)."""
    specs = []
    for variant in sweep.trial_grid():
        try:
            specs.append(sweep.run_spec({"variant": variant}, "trial"))
        except ConfigError:
            continue
    return specs


def require_trial_drivers() -> None:
    if ray.cluster_resources().get("trial_driver", 0) < 1:
        raise ConfigError("the Ray cluster has no 'trial_driver' resource, which every sweep trial "
                          "holds; start its head node with --resources='{\"trial_driver\": 8}' "
                          "(cluster.yaml: resources of the head node type)")


# --- the search --------------------------------------------------------------------------------

def total_trials(sweep: SweepSpec) -> int:
    return sweep.samples * len(sweep.trial_grid())


def tune_config(sweep: SweepSpec) -> tune.TuneConfig:
    # Every trial holds the same resources, so a trial's process (torch, raydist and the data's
    # loaders imported) runs the next trial instead of a fresh one starting; PBT's pauses too
    return tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, num_samples=sweep.samples,
                           scheduler=search.scheduler(sweep), search_alg=search.searcher(sweep),
                           reuse_actors=True)


def run_config(sweep: SweepSpec, root: Path) -> tune.RunConfig:
    return tune.RunConfig(name="tune", storage_path=str(root), verbose=0,
                          callbacks=[Progress(root, total_trials(sweep), sweep.metric),
                                     *tracking.tune_callbacks(sweep.base.get("tracking"), root)])


# --- one trial ---------------------------------------------------------------------------------

def make_trial(sweep: SweepSpec, root: Path, cwd: str) -> Callable[[dict[str, Any]], None]:
    def trial(config: dict[str, Any]) -> None:
        if Path(cwd).is_dir():  # Tune moves trials into its own folder; relative paths are the user's
            os.chdir(cwd)
        out = root / "trials" / tune.get_context().get_trial_id()
        if get_state(out)["status"] in FINAL:  # it ended before an interruption Tune's state missed
            return
        out.mkdir(parents=True, exist_ok=True)
        set_state(out, "running")
        try:
            spec = sweep.run_spec(config, str(out))
            spec.save(out / "spec.yaml")
            if sweep.scheduler == "pbt":  # a run that checkpoints through Tune, to be cloned
                pbt.train(spec, out)
            else:
                train(spec, report=reporter(out), track=False)  # Tune's callbacks track it
        except Diverged as e:
            set_state(out, "diverged", str(e))
            return
        except (ConfigError, Stalled) as e:  # e.g. more workers than the cluster has, or a wait
            set_state(out, "error", str(e))  # that cannot end: one line, no traceback
            return
        except Exception as e:
            set_state(out, "error", f"{type(e).__name__}: {e}")
            raise
        set_state(out, "completed")

    return trial


def reporter(out: Path) -> Callable[[Record], None]:
    """Each epoch: into the trial's epochs.csv (kept whatever ends the trial), then to Tune."""
    history: list[Record] = []

    def report(rec: Record) -> None:
        history.append(scalars(rec))  # the workers' own memory goes to the trial's memory.csv
        pd.DataFrame(history).to_csv(out / EPOCHS, index=False)
        tune.report(scalars(rec))

    return report


def set_state(out: Path, status: str, message: str = "") -> None:
    (out / STATE).write_text(yaml.safe_dump({"status": status, "message": message}))


def get_state(out: Path) -> dict[str, str]:
    path = out / STATE
    return yaml.safe_load(path.read_text()) if path.exists() else {"status": "running", "message": ""}


class Progress(tune.Callback):
    """One line per trial start, epoch and end. Marks the trials the scheduler stopped early.
    At a terminal, a status line below them: trials done / running / pending, and an ETA."""

    def __init__(self, root: Path, total: int, metric: str) -> None:
        self.root, self.total, self.metric = root, total, metric
        self.status: SweepLine | None = None  # made on the driver, where Tune calls the callback

    def line(self, text: str, trials: list, ending: Any = None) -> None:
        self.status = self.status or SweepLine(self.total)
        self.status.write(text)
        self.status.update(done(trials, ending), sum(t.status == "RUNNING" and t is not ending
                                                      for t in trials))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.status is not None:
            self.status.close()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.line(f"[{done(trials)}/{self.total}] {trial.trial_id} started   {describe(trial.config)}",
                  trials)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        value = result.get(self.metric, float("nan"))
        self.line(f"      {trial.trial_id} epoch {result['epoch']}  {self.metric} {value:.4f}  "
                  f"{result['samples_per_s']:.0f} samples/s", trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.finished(trials, trial, "stopped")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.finished(trials, trial, "error")

    def finished(self, trials: list, trial: Any, status: str) -> None:
        out = self.root / "trials" / trial.trial_id
        state = get_state(out)
        if state["status"] not in FINAL and out.exists():
            why = {"stopped": "stopped early by the scheduler",
                   "error": f"the trial's process failed; see {trial.error_file}"}
            state = {"status": status, "message": why[status]}
            set_state(out, **state)
        note = f"  {state['message']}" if state["status"] in ("diverged", "error") else ""
        self.line(f"[{done(trials, trial)}/{self.total}] {trial.trial_id} {state['status']}{note}",
                  trials, trial)


def done(trials: list, ending: Any = None) -> int:
    return sum(t.status in ("TERMINATED", "ERROR") or t is ending for t in trials)


def describe(config: dict[str, Any]) -> str:
    flat = {**config.get("variant", {}), **{k: v for k, v in config.items() if k != "variant"}}
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in flat.items())


# --- after the trials: what this machine allows, and what a cluster would ------------------------

def finished(root: Path, total: int) -> bool:
    """Whether every trial has ended (the fit was not interrupted)."""
    states = [get_state(d)["status"] for d in (root / "trials").glob("*") if (d / STATE).exists()]
    return len(states) >= total and "running" not in states


def measure_machine(sweep: SweepSpec, root: Path) -> None:
    """On the sweep's Ray, once (a resumed sweep keeps what it has): the compute-only bound of
    each setting the sweep scales (sweep.bound, DIR/bound.csv) and `raydist plan`'s prediction
    for it on a cluster (sweep.plan, DIR/plan/)."""
    scaled, counts = bound.wanted(trial_specs(sweep))
    if not scaled:
        return
    if sweep.bound and bound.load(root) is None:
        print(f"sweep: measuring this machine's bound: {len(scaled)} setting(s) on "
              f"{', '.join(map(str, counts))} bare actors", flush=True)
        bound.save(bound.measure(scaled, counts), root)
    if sweep.plan and not (root / PLAN / "plan.csv").exists():
        print(f"sweep: calibrating `raydist plan` for {sweep.plan['workers']} workers on "
              f"{sweep.plan['bandwidth']}", flush=True)
        predict_cluster(sweep.plan, scaled[0], counts, root / PLAN)


PLAN = "plan"


def predict_cluster(given: dict[str, Any], spec: RunSpec, counts: list[int], out: Path) -> None:
    """`raydist plan` for `spec` at the sweep's counts and the cluster's: one worker per node,
    each computing as this machine's core does, on the given links."""
    from raydist import plan
    from raydist.plan import calibration

    every = sorted({*counts, given["workers"]})
    net = plan.Network(plan.parse_bandwidth(given["bandwidth"]), plan.parse_duration(given["latency"]))
    costs = calibration.calibrate(spec, every, workers_per_node=1)
    plan.write(plan.predict(costs, net, spec.global_batch, every, spec.microbatches), out)


# --- results -----------------------------------------------------------------------------------

def collect(root: Path) -> pd.DataFrame:
    """results.csv and results.parquet from the trial folders: one row per trial per epoch (a
    trial that never finished an epoch keeps one row, for its status and message)."""
    frames = [trial_rows(d) for d in sorted((root / "trials").glob("*")) if (d / STATE).exists()]
    if not frames:  # interrupted before any trial started
        return pd.DataFrame(columns=["trial_id", "status"])
    results = pd.concat(frames, ignore_index=True)
    results.to_parquet(root / "results.parquet", index=False)
    results.to_csv(root / "results.csv", index=False)
    return pd.read_csv(root / "results.csv")  # the table as the report will read it


def interrupted(results: pd.DataFrame) -> bool:
    """Whether the sweep that returned `results` left trials unfinished (Tune's fit was stopped)."""
    return bool(getattr(results, "attrs", {}).get("interrupted"))


def trial_rows(out: Path) -> pd.DataFrame:
    state = get_state(out)
    status = "interrupted" if state["status"] == "running" else state["status"]
    epochs = out / EPOCHS
    rows = pd.read_csv(epochs) if epochs.exists() else pd.DataFrame([{"epoch": None}])
    spec = yaml.safe_load((out / "spec.yaml").read_text()) if (out / "spec.yaml").exists() else {}
    front = pd.DataFrame({"trial_id": out.name, "status": status}, index=rows.index)
    # a field the epochs carry themselves (PBT's lr) is the value of each epoch, not the last
    back = pd.DataFrame({k: [flat(v)] * len(rows) for k, v in spec.items() if k not in rows},
                        index=rows.index)
    back["message"] = state["message"]
    for key, value in pbt.lineage(out).items():
        back[key] = value
    return pd.concat([front, rows, back], axis=1)


def summarize(results: pd.DataFrame, total: int, root: Path) -> bool:
    """Print the trials' outcome; True if some never finished."""
    trials = results.drop_duplicates("trial_id") if len(results) else results
    counts = trials["status"].value_counts().to_dict() if len(trials) else {}
    print(f"sweep: {len(trials)} of {total} trials: "
          + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())), flush=True)
    finished = sum(n for status, n in counts.items() if status != "interrupted")
    if finished < total:
        print(f"sweep: interrupted; continue it with `raydist sweep --resume {root}`", flush=True)
    if len(results):
        print(f"wrote {root / 'results.csv'} and results.parquet", flush=True)
    return finished < total
