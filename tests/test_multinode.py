"""Several Ray nodes on this machine (ray.cluster_utils.Cluster): ddp, ps and pipeline spread their
workers over the nodes and survive losing a node mid-run (the run ends exactly where an
undisturbed one does), and elastic ddp (`workers: [min, max]`) grows its worker group when a
node joins.

The scenarios run one after the other in one driver process (tests/multinode_driver.py) on one
cluster, with a private RAY_TMPDIR: a process joins one Ray only, and this session lives in its
embedded one. Before each run the driver adds or removes idle nodes, so that each starts on as
many fresh worker nodes as it needs; one cluster and one driver instead of one per scenario
saves their start-up and shutdown three times. The driver shuts its cluster down; a test checks
that no process of that cluster outlives it, and any is stopped by PID if one does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from rayprocs import processes_of, stop

from raydist import cli
from raydist.config import ConfigError, RunSpec
from raydist.config.run import read_only
from raydist.data import load_data
from raydist.strategies import ddp
from raydist.train import train

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("multinode_driver.py")
RUN_LIMIT_S = 150  # each run in the driver, its share of the nodes' start-up included
CLEANUP_S = 25  # kept back from the driver's time: the checks and clean-up after it
EPOCHS = 3  # the node is lost after epoch 2; as tests/test_ddp.py's runs, whose adam one is ddp's reference
BASE = {"model": "mlp", "data": "digits", "hidden": [16], "epochs": EPOCHS, "batch_size": 64,
        "seed": 0, "val_fraction": 0.1, "optimizer": "adam", "threads_per_worker": 1,
        "max_failures": 1}
# Worker nodes have 1 CPU each and the head none, so every actor that needs a CPU sits on a
# worker node of its own (a 0.5-CPU ps server cannot share with a 1-CPU replica), and a lost
# node leaves too few CPUs until its replacement joins: the restarted run must use it.
LAYOUT: dict[str, tuple[dict[str, Any], int, int]] = {
    # strategy: (its fields, worker nodes, strategy actors)
    "ddp": ({"workers": 2}, 2, 2),
    "ps": ({"workers": 2, "servers": 1, "mode": "sync"}, 3, 3),
    "pipeline": ({"stages": 2, "microbatches": 4}, 2, 2),
}


# --- running the driver -------------------------------------------------------------------------

@dataclass
class Driver:
    """How the driver process ended: its result.json (per run, as far as it got), whether it ended
    by itself before its deadline, its exit code, and the processes of its cluster still alive
    after it (and a grace period)."""

    work: Path
    result: dict[str, Any]
    in_time: bool
    returncode: int | None
    left: list[int]

    def run(self, name: str) -> dict[str, Any]:
        """The result of one run; the test fails with the driver's progress if there is none."""
        runs = self.result.get("runs", {})
        if name not in runs:
            why = self.result.get("error") or ("it ran out of time" if not self.in_time else "")
            pytest.fail(f"the driver never finished run {name!r} {why}\n"
                        f"{tail(self.work / 'progress.log')}\n{tail(self.work / 'driver.log')}")
        assert "error" not in runs[name], runs[name]["error"]
        return runs[name]


@contextmanager
def driving(work: Path, runs: list[dict[str, Any]]) -> Iterator[Any]:
    """Start the runs in a driver process and cluster of their own (the caller may work
    meanwhile); yields an object with `done(name)` (has that run finished?) and
    `finished(deadline)` (wait for the driver, then a Driver). Whatever is left of it is stopped,
    by PID, on the way out."""
    work.mkdir(parents=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rmn", dir="/tmp"))  # short: Ray's socket paths live here
    (work / "config.json").write_text(json.dumps({"work": str(work), "runs": runs}))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_TMPDIR"] = str(ray_tmp)
    with (work / "driver.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, str(DRIVER), str(work / "config.json")], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT)

    def read() -> dict[str, Any]:
        try:
            return json.loads((work / "result.json").read_text())
        except (OSError, ValueError):  # not written yet, or being rewritten
            return {}

    class Handle:
        @staticmethod
        def done(name: str) -> bool:
            return proc.poll() is not None or name in read().get("runs", {})

        @staticmethod
        def finished(deadline: float) -> Driver:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return Driver(work, read(), False, None, [])
            return Driver(work, read(), True, proc.returncode, leftovers(str(ray_tmp)))

    try:
        yield Handle()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop(processes_of(str(ray_tmp)))
        shutil.rmtree(ray_tmp, ignore_errors=True)


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text()[-chars:] if path.exists() else f"({path.name}: none)"


def leftovers(marker: str, wait_s: float = 15.0) -> list[int]:
    """Processes of the cluster named by `marker` still alive after a grace period (the last
    ones exit just after the driver)."""
    deadline = time.monotonic() + wait_s
    while (pids := processes_of(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return pids


def attempts(log: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """ddp rank 0's records split by worker group: a new group starts again from epoch 1 (the
    epochs of the checkpoint it restored, then the ones it trains)."""
    groups: list[list[dict[str, Any]]] = []
    for rec in log:
        if not groups or rec["epoch"] <= groups[-1][-1]["epoch"]:
            groups.append([])
        groups[-1].append({k: v for k, v in rec.items() if k != "arrived"})
    return groups


def load_model(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt")


# --- the runs: one driver, one cluster ------------------------------------------------------------

# grows after epoch 2; the grown group trains epochs 3 and 4
ELASTIC = {**BASE, "strategy": "ddp", "workers": [1, 2], "epochs": 4}
# elastic first, on a fresh 1-node cluster: it starts Ray Train's autoscaling coordinator (its 1 s
# refresh) before any other run does, and the references below wait until it is done, so that
# its group, held at the gate until the grown group arrives, never waits for CPUs. The pipeline
# last: a run that hangs costs only the runs after it.
RUNS = [{"name": "elastic", "scenario": "elastic", "nodes": 1, "grow_after": 2, "spec": ELASTIC},
        *({"name": strategy, "scenario": "loss", "nodes": nodes, "kill_after": 2,
           "spec": {**BASE, "strategy": strategy, **fields}}
          for strategy, (fields, nodes, _) in LAYOUT.items())]
LIMIT_S = RUN_LIMIT_S * len(RUNS)  # every test of the driver's runs: the first one waits for all


def references(tmp: Path, trained: Any) -> dict[str, Any]:
    """What each run is compared with, trained in this session's embedded Ray (or found already
    trained there by an earlier module, see conftest.Trained): an undisturbed run of each
    node-loss spec, local for elastic. An error is kept for the test of that run."""
    found: dict[str, Any] = {}
    for run in RUNS:
        raw = run["spec"] if run["scenario"] == "loss" else {  # local: the knobs it reads
            **read_only({**run["spec"], "strategy": "local"}), "workers": 1}
        spec = RunSpec.from_dict({**raw, "out": str(tmp / run["name"])})
        try:
            found[run["name"]] = trained.get(spec) or train(spec, report=lambda rec: None)
        except Exception as e:  # noqa: BLE001 - raised in that run's test
            found[run["name"]] = e
    return found


@pytest.fixture(scope="module")
def cluster_runs(ray_local, tmp_path_factory, trained) -> tuple[Driver, dict[str, Any]]:
    """The driver's runs, and their references (trained while the driver goes on)."""
    tmp = tmp_path_factory.mktemp("multinode")
    deadline = time.monotonic() + LIMIT_S - CLEANUP_S
    with driving(tmp / "work", RUNS) as driver:
        while not driver.done("elastic") and time.monotonic() < deadline:
            time.sleep(0.5)
        refs = references(tmp / "reference", trained)
        return driver.finished(deadline), refs


def reference(refs: dict[str, Any], name: str) -> Any:
    if isinstance(refs[name], Exception):
        raise refs[name]
    return refs[name]


# --- spread over nodes, and a node lost mid-run --------------------------------------------------

@pytest.mark.multinode
@pytest.mark.timeout(LIMIT_S)
@pytest.mark.parametrize("strategy", list(LAYOUT))
def test_spread_over_nodes_and_a_lost_node(cluster_runs, strategy):
    """The strategy's actors sit on every worker node of the cluster. After epoch 2's checkpoint
    the machine of one of them dies and a replacement node joins: the run restarts from that
    checkpoint on the survivor(s) and the new node, reports every epoch once, and ends with
    exactly the parameters of an undisturbed run (in this session's embedded Ray)."""
    driver, refs = cluster_runs
    _, n_nodes, n_actors = LAYOUT[strategy]
    r = driver.run(strategy)
    undisturbed = reference(refs, strategy).state_dict

    event = r["event"]
    spread = event["alive_before"]  # the first attempt's actors, just before the loss
    assert len(spread) == n_actors
    assert len(r["workers_at_start"]) == n_nodes
    assert {a["node"] for a in spread} == set(r["workers_at_start"])  # all worker nodes, never the head
    killed, replacement = event["killed"], event["replacement"]
    assert killed in {a["node"] for a in spread}
    restarted = [a for a in r["lost_node"] if a["id"] not in {b["id"] for b in spread}]
    assert len(restarted) == n_actors
    assert killed not in {a["node"] for a in restarted}
    assert replacement in {a["node"] for a in restarted}

    assert r["reported"] == list(range(1, EPOCHS + 1))  # a restart from scratch would repeat 1, 2
    if strategy == "ddp":  # its driver reports each epoch once anyway; rank 0's own log shows more
        before, after = attempts(r["gate_log"])
        assert [rec["epoch"] for rec in before] == [1, 2, 3]  # held at 3 until the node was lost
        assert [rec["epoch"] for rec in after] == list(range(1, EPOCHS + 1))
        assert after[:2] == before[:2]  # epochs 1-2 came back from the checkpoint, not retrained
        # ddp's record channel lives on the driver's node, which a run never loses
        assert {a["node"] for a in r["all_actors"] if a["class"] == "Gate"} == {"head"}

    lost = driver.work / strategy / "lost_node"
    assert list(pd.read_csv(lost / "metrics.csv")["epoch"]) == list(range(1, EPOCHS + 1))
    result = load_model(lost)
    assert list(result) == list(undisturbed)
    assert all(torch.equal(result[k], undisturbed[k]) for k in undisturbed)


# --- elastic ddp ----------------------------------------------------------------------------------

@pytest.mark.multinode
@pytest.mark.timeout(LIMIT_S)
def test_elastic_ddp_grows_when_a_node_joins(cluster_runs):
    """workers [1, 2] on one 1-CPU node: the group starts with 1 worker. After epoch 2 a second
    node joins; Ray Train's elastic policy restarts the group with 2 workers from the latest
    checkpoint. Every epoch is in metrics.csv once, each with the world size that trained it,
    and the model is local's: the global batch is split, never changed, by the world size."""
    driver, refs = cluster_runs
    r = driver.run("elastic")
    local = reference(refs, "elastic")

    out = driver.work / "elastic" / "elastic"
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["epoch"]) == list(range(1, ELASTIC["epochs"] + 1))
    sizes = list(metrics["world_size"])
    assert sizes[0] == 1 and sizes[-1] == 2 and sizes == sorted(sizes), sizes

    small, grown = attempts(r["gate_log"])
    assert {rec["world_size"] for rec in small} == {1}
    restored = [rec for rec in grown if rec["world_size"] == 1]
    assert restored and restored == small[:len(restored)]  # the grown group resumed a checkpoint
    assert [rec["epoch"] for rec in grown] == list(range(1, ELASTIC["epochs"] + 1))
    assert len(r["workers"]) == 3  # one worker, then a group of two
    assert len(r["workers_at_start"]) == 1
    assert {a["node"] for a in r["workers"]} == {*r["workers_at_start"], r["event"]["added"]}

    model = load_model(out)
    assert list(model) == list(local.state_dict)
    assert max((model[k] - local.state_dict[k]).abs().max().item() for k in model) <= 1e-5
    assert metrics["train_loss"].tolist() == pytest.approx([m["train_loss"] for m in local.metrics],
                                                           rel=1e-5)


@pytest.mark.multinode
@pytest.mark.timeout(LIMIT_S)
def test_the_driver_ends_and_leaves_no_process_behind(cluster_runs):
    """The driver finished every run in time, by itself, and shut its cluster down: no process
    of that cluster is left."""
    driver, _ = cluster_runs
    assert driver.in_time, f"the driver ran out of time; its progress:\n{tail(driver.work / 'progress.log')}"
    assert "error" not in driver.result, driver.result["error"]
    assert list(driver.result["runs"]) == [run["name"] for run in RUNS]
    failed = [name for name, r in driver.result["runs"].items() if "error" in r]
    assert driver.returncode == (1 if failed else 0), tail(driver.work / "driver.log")
    assert driver.left == [], f"processes of the driver's cluster still alive: {driver.left}"


# --- `workers: [min, max]`: parsing and checks (no Ray) ------------------------------------------

@pytest.mark.unit
def test_workers_range_from_yaml_cli_and_set(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("strategy: ddp\nworkers: [1, 3]\n")
    forms = {"yaml": ["--config", str(config)], "flag": ["--strategy", "ddp", "--workers", "1-3"],
             "set": ["--strategy", "ddp", "--set", "workers=[1, 3]"]}
    for argv in forms.values():
        spec = cli.spec_from_args(cli.build_parser().parse_args(["train", *argv]))
        assert (spec.workers, spec.min_workers, spec.max_workers) == ([1, 3], 1, 3)
    plain = RunSpec.from_dict({"strategy": "ddp", "workers": "2"})
    assert (plain.workers, plain.min_workers, plain.max_workers) == (2, 2, 2)
    spec.save(tmp_path / "spec.yaml")
    assert RunSpec.from_dict(yaml.safe_load((tmp_path / "spec.yaml").read_text())) == spec


@pytest.mark.unit
@pytest.mark.parametrize("raw, message", [
    ({"strategy": "ps", "workers": [1, 2]},
     "workers: got [1, 2]; a range [min, max] (elastic scaling) needs strategy ddp, not 'ps'"),
    ({"workers": "1-2"},
     "workers: got [1, 2]; a range [min, max] (elastic scaling) needs strategy ddp, not 'local'"),
    ({"strategy": "ddp", "workers": [2, 1]},
     "workers: got [2, 1]; expected an integer >= 1, or [min, max] with 1 <= min <= max"),
    ({"strategy": "ddp", "workers": [0, 2]},
     "workers: got [0, 2]; expected an integer >= 1, or [min, max] with 1 <= min <= max"),
    ({"strategy": "ddp", "workers": [1, 2, 3]},
     "workers: got [1, 2, 3]; expected an integer or a range [min, max]"),
    ({"strategy": "ddp", "workers": "1-"}, "workers: got '1-'; expected an integer or a range [min, max]"),
])
def test_workers_range_errors(raw, message):
    with pytest.raises(ConfigError) as e:
        RunSpec.from_dict(raw)
    assert str(e.value) == message


@pytest.mark.unit
def test_cli_range_for_ps_is_one_error(capsys):
    assert cli.main(["train", "--strategy", "ps", "--workers", "1-2"]) == 2
    assert capsys.readouterr().err == ("error: workers: got [1, 2]; a range [min, max] (elastic "
                                       "scaling) needs strategy ddp, not 'ps'\n")


@pytest.mark.unit
def test_elastic_batch_divides_by_every_world_size(tmp_path):
    spec = RunSpec.from_dict({**ELASTIC, "workers": [2, 3], "out": str(tmp_path)})
    data = load_data(spec)
    with pytest.raises(ConfigError) as e:
        ddp.check(spec, data)
    assert str(e.value) == ("batch_size: got 64; the global batch must divide by every worker count "
                            "in [2, 3] (elastic), i.e. by 6, e.g. 60")
    ddp.check(spec.replace(batch_size=60), data)  # 1617 % 60 = 57: the last batch splits too
    ddp.check(spec.replace(workers=[1, 2]), data)
    assert ddp.num_workers(spec) == (2, 3) and ddp.num_workers(spec.replace(workers=2)) == 2
