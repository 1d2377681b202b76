"""Nothing waits forever (raydist/runtime/stall.py): when no training step finishes for
`stall_timeout_s`, a run on Ray stops with one line saying, from Ray's view, what it waits on, and
keeps the checkpoints it wrote before. `RAYDIST_STALL=1:2` makes worker, replica or stage 1 wait in
epoch 2 on a Ray task that asks for a resource no node has.

The watchdog's rule and its wording run without Ray (unit). ddp, ps and pipeline stall in this
process on the session's Ray, through cli.main: exit code 1 and the one line on stderr. A
sweep's trial reads its environment in Tune's trial process, so the sweep runs as one CLI
subprocess with a Ray of its own (multinode): its stalled trial ends as an error, the sweep goes
on and ends."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from raydist.config import ConfigError, RunSpec
from raydist.engine import checkpoint
from raydist.runtime import stall
from raydist.runtime.stall import Beats, Stalled, Watchdog, describe

STALL_S = 3.0
MARGIN_S = 60.0  # the state API's answers, and Ray Train aborting its worker group (at most 30 s)
BASE = {"model": "mlp", "data": "digits", "hidden": [16], "epochs": 3, "seed": 0, "val_fraction": 0.1,
        "optimizer": "adam", "batch_size": 64, "stall_timeout_s": STALL_S}
LINE = (r"stalled: no training step finished for \d+ s; waiting on: 1 Ray task unschedulable needs "
        r"1 nonexistent; no node has nonexistent")
REPO = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --- the rule and the line, without Ray -----------------------------------------------------------

@pytest.mark.unit
def test_the_first_step_gets_start_up_time_later_ones_a_multiple_of_the_slowest(monkeypatch):
    monkeypatch.setattr(stall, "ray_view", lambda: "Ray's view")
    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)
    clock = Clock()
    watch = Watchdog(5.0, clock)
    assert watch.limit == stall.START_S  # start-up: workers start, import, compile
    clock.now = stall.START_S
    watch.check()
    watch.step()  # the first step, warm-up included, is not measured
    assert watch.limit == 5.0
    clock.now += 2.0
    watch.step()
    assert watch.limit == 20.0  # 10 x the slowest step
    watch.step(0.1)  # a worker's own measure
    assert watch.limit == 20.0
    clock.now += 20.0
    watch.check()
    clock.now += 1.0
    with pytest.raises(Stalled, match=r"^stalled: no training step finished for 21 s; "
                                      r"waiting on: Ray's view$"):
        watch.check()
    watch.restart()  # a new worker group: start-up's limit again
    assert watch.limit == stall.START_S


@pytest.mark.unit
def test_an_autoscaling_clusters_start_timeout_extends_the_first_step(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    assert Watchdog(5.0).limit == 600.0
    assert Watchdog(900.0).limit == 900.0


@pytest.mark.unit
def test_the_line_names_pending_work_its_demand_and_who_holds_the_cluster():
    task = SimpleNamespace(name="ReadParquet", required_resources={"CPU": 1.0})
    workers = [SimpleNamespace(class_name="RayTrainWorker", state="ALIVE", required_resources={"CPU": 1.0})
               for _ in range(2)]
    channel = SimpleNamespace(class_name="Channel", state="ALIVE", required_resources={})
    waiting = SimpleNamespace(class_name="Stage", state="PENDING_CREATION",
                              required_resources={"CPU": 1.0, "GPU": 1.0})
    group = SimpleNamespace(bundles=[{"unit_resources": {"CPU": 1.0}}, {"unit_resources": {"CPU": 1.0}}])
    assert describe([task, task], [*workers, channel], [], {"CPU": 0.0}, {"CPU": 2.0}) == (
        "2 Ray tasks ReadParquet need 1 CPU each; CPU: 0 of 2 free, held by 2 RayTrainWorker")
    assert describe([], [waiting], [group], {"CPU": 1.0}, {"CPU": 4.0}) == (
        "1 actor Stage needs 1 CPU, 1 GPU; 1 placement group needs 2 CPU; CPU: 1 of 4 free; "
        "no node has GPU")
    assert describe([], [channel], [], {"CPU": 4.0}, {"CPU": 4.0}) == (
        "no task, actor or placement group of this run is pending in Ray (a process is blocked "
        "inside a step: a collective, I/O, a lock); CPU: 4 of 4 free")


@pytest.mark.unit
def test_a_worker_beats_at_most_once_per_interval_with_its_slowest_step(monkeypatch):
    sent: list[float] = []
    now = iter([0.0, 0.5, 0.9, 1.2, 1.3])
    monkeypatch.setattr(stall.time, "monotonic", lambda: next(now))
    beats = Beats(sent.append, every=1.0)
    for seconds in (0.1, 0.4, 0.3, 0.2, 0.05):
        beats.stepped(seconds)
    assert sent == [0.1, 0.4]  # the first step at once (0.0), then at 1.2 the slowest since


@pytest.mark.unit
def test_stall_timeout_is_positive_resumable_and_read_by_every_ray_strategy():
    with pytest.raises(ConfigError, match=r"^stall_timeout_s: got 0.0; expected a number > 0$"):
        RunSpec.from_dict({"strategy": "ps", "stall_timeout_s": 0})
    for strategy in ("ddp", "ps", "pipeline", "fsdp", "tp"):
        RunSpec.from_dict({"strategy": strategy, "stall_timeout_s": 5}).refuse_unread()
    with pytest.raises(ConfigError, match=r"^stall_timeout_s: read only by ddp, ps, pipeline, fsdp, "
                                          r"tp; this run's strategy is local$"):
        RunSpec.from_dict({"stall_timeout_s": 5}).refuse_unread()
    RunSpec.from_dict({}).refuse_unread()  # local runs in this process: nothing of Ray to wait on


# --- ddp, ps and pipeline on the session's Ray --------------------------------------------------------

def stalled_in(out: Path, t: float) -> float:
    """Seconds from the stall's start (its marker) to `t`."""
    return t - (out / ".stall_fired").stat().st_mtime


def alive(classes: set[str]) -> set[str]:
    """The ids of the live actors of `classes` in the session's Ray."""
    from ray.util.state import list_actors

    rows = list_actors(filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False)
    return {a.actor_id for a in rows if a.class_name in classes}


def left_behind(classes: set[str], before: set[str]) -> list[str]:
    """The run's actors (started since `before`) still alive some seconds after the run ended,
    and the stall's task if the watchdog's view still sees it waiting."""
    deadline = time.monotonic() + 20
    while True:
        left = sorted(alive(classes) - before)
        left += ["unschedulable"] if "unschedulable" in stall.ray_view() else []
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


RUNS = {  # strategy: (its flags, the classes of its actors)
    "ddp": (["--workers", "2"], {"RayTrainWorker", "TrainController"}),
    "ps": (["--workers", "2"], {"Replica", "Server"}),
    "pipeline": (["--stages", "2"], {"Stage"}),
}


@pytest.mark.ray
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(RUNS))
def test_a_run_waiting_on_what_nothing_can_give_exits_1_naming_it(ray_local, tmp_path, monkeypatch, capsys,
                                                                  name):
    """`raydist train` in this process (cli.main): its exit code and its console."""
    from raydist import cli

    out = tmp_path / name
    monkeypatch.setenv("RAYDIST_STALL", "1:2")  # rank, replica or stage 1, in epoch 2
    flags, classes = RUNS[name]
    args = ["train", "--strategy", name, *flags, "--out", str(out), "--hidden", "16"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in BASE.items() if k != "hidden"]
    before = alive(classes)
    code = cli.main(args)
    took = stalled_in(out, time.time())
    err = capsys.readouterr().err
    assert code == 1, err
    assert re.fullmatch(f"error: {LINE}\n", err), err  # one line: Ray's account went to ray.log
    assert STALL_S <= took < STALL_S + MARGIN_S
    assert left_behind(classes, before) == []
    if name != "ddp":  # epoch 1's checkpoint, written before the stall
        assert [r["epoch"] for r in checkpoint.load(out / "checkpoint.pt")["history"]] == [1]
    else:  # Ray Train's checkpoints: rank 1 stalled before its part of epoch 2's
        saved = [checkpoint.load(p)["history"][-1]["epoch"]
                 for p in out.glob("ray/ddp/checkpoint_*/state.pt")]
        assert 1 in saved, saved


# --- a sweep, in a process of its own ------------------------------------------------------------------

SWEEP = """
model: mlp
data: digits
hidden: [16]
epochs: 3
batch_size: 64
val_fraction: 0.1
sweep:
  max_concurrent: 1
  variants: [{strategy: ps, workers: 2, stall_timeout_s: 3}, {strategy: local}]
"""


@pytest.mark.multinode
@pytest.mark.timeout(900)
def test_a_stalled_sweep_trial_ends_as_an_error_and_the_sweep_goes_on(tmp_path):
    import os

    (tmp_path / "sweep.yaml").write_text(SWEEP)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYDIST_FAULT")}
    env.update(PYTHONPATH=str(REPO), RAYDIST_STALL="1:2")
    done = subprocess.run([sys.executable, "-m", "raydist.cli", "sweep", str(tmp_path / "sweep.yaml"),
                           "--out", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=800, start_new_session=True)
    assert done.returncode == 0, done.stdout + done.stderr
    states = {yaml.safe_load((d / "spec.yaml").read_text())["strategy"]:
              yaml.safe_load((d / "trial.yaml").read_text()) for d in (tmp_path / "out" / "trials").iterdir()}
    assert states["local"]["status"] == "completed"
    assert states["ps"]["status"] == "error"
    message = states["ps"]["message"]  # Tune's next trial may wait too: the line names it
    assert re.match(r"stalled: no training step finished for \d+ s; waiting on: ", message), message
    assert "1 Ray task unschedulable needs 1 nonexistent" in message and "no node has nonexistent" in message
    assert "sweep: 2 of 2 trials: 1 completed, 1 error" in done.stdout, done.stdout
