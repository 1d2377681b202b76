"""Several Ray nodes on this machine (ray.cluster_utils.Cluster): ddp, ps and pipeline spread their
workers over the nodes and survive losing a node mid-run (the run ends exactly where an
undisturbed one does), and elastic ddp (`workers: [min, max]`) grows its worker group when a
node joins.

Each scenario runs in a driver process of its own (tests/multinode_driver.py) with a private
RAY_TMPDIR: a process joins one Ray only, and this session lives in its embedded one. The driver
shuts its cluster down; the test checks that no process of that cluster outlives it, and stops
any by PID if one does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from rayprocs import processes_of, stop

from raydist import cli
from raydist.config import ConfigError, RunSpec
from raydist.data import load_data
from raydist.strategies import ddp, train

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("multinode_driver.py")
TEST_LIMIT_S = 180  # each multi-node test, all included
CLEANUP_S = 25  # kept back from a driver's time: the checks and clean-up after it
EPOCHS = 4
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


# --- running a driver ----------------------------------------------------------------------------

@contextmanager
def driving(work: Path, scenario: str, **config: Any) -> Iterator[Callable[[float], dict[str, Any]]]:
    """Start one scenario in its own process and cluster (the caller may work meanwhile); yields
    `finished(deadline)`, which waits for the driver and returns its result.json once every
    process of its cluster is gone. Whatever is left of it is stopped, by PID, on the way out."""
    work.mkdir(parents=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rmn", dir="/tmp"))  # short: Ray's socket paths live here
    (work / "config.json").write_text(json.dumps({"scenario": scenario, "work": str(work), **config}))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_TMPDIR"] = str(ray_tmp)
    with (work / "driver.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, str(DRIVER), str(work / "config.json")], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT)

    def result(deadline: float) -> dict[str, Any]:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the driver ran out of time; its progress:\n{tail(work / 'progress.log')}")
        left = leftovers(str(ray_tmp))
        result_file = work / "result.json"
        assert result_file.exists(), tail(work / "driver.log")
        out = json.loads(result_file.read_text())
        assert "error" not in out, out["error"]
        assert proc.returncode == 0, tail(work / "driver.log")
        assert left == [], f"processes of the driver's cluster still alive: {left}"
        return out

    try:
        yield result
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


# --- spread over nodes, and a node lost mid-run --------------------------------------------------

@pytest.mark.timeout(TEST_LIMIT_S)
@pytest.mark.parametrize("strategy", list(LAYOUT))
def test_spread_over_nodes_and_a_lost_node(ray_local, tmp_path, strategy):
    """The strategy's actors sit on every worker node of the cluster. After epoch 2's checkpoint
    the machine of one of them dies and a replacement node joins: the run restarts from that
    checkpoint on the survivor(s) and the new node, reports every epoch once, and ends with
    exactly the parameters of an undisturbed run (in this session's embedded Ray)."""
    deadline = time.monotonic() + TEST_LIMIT_S - CLEANUP_S
    fields, n_nodes, n_actors = LAYOUT[strategy]
    spec = {**BASE, "strategy": strategy, **fields}
    work = tmp_path / "work"
    with driving(work, "loss", nodes=n_nodes, kill_after=2, spec=spec) as finished:
        # while the driver's cluster starts
        reference = train(RunSpec.from_dict({**spec, "out": str(tmp_path / "undisturbed")}),
                          report=lambda rec: None).state_dict
        r = finished(deadline)

    event = r["event"]
    spread = event["alive_before"]  # the first attempt's actors, just before the loss
    assert len(spread) == n_actors
    assert {a["node"] for a in spread} == {f"n{i}" for i in range(1, n_nodes + 1)}  # never the head
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

    lost = work / "lost_node"
    assert list(pd.read_csv(lost / "metrics.csv")["epoch"]) == list(range(1, EPOCHS + 1))
    result = load_model(lost)
    assert list(result) == list(reference)
    assert all(torch.equal(result[k], reference[k]) for k in reference)


# --- elastic ddp ----------------------------------------------------------------------------------

ELASTIC = {**BASE, "strategy": "ddp", "workers": [1, 2], "epochs": 6}


@pytest.mark.timeout(TEST_LIMIT_S)
def test_elastic_ddp_grows_when_a_node_joins(tmp_path):
    """workers [1, 2] on one 1-CPU node: the group starts with 1 worker. After epoch 2 a second
    node joins; Ray Train's elastic policy restarts the group with 2 workers from the latest
    checkpoint. Every epoch is in metrics.csv once, each with the world size that trained it,
    and the model is local's: the global batch is split, never changed, by the world size."""
    deadline = time.monotonic() + TEST_LIMIT_S - CLEANUP_S
    work = tmp_path / "work"
    with driving(work, "elastic", nodes=1, grow_after=2, spec=ELASTIC) as finished:
        local = train(RunSpec.from_dict({**ELASTIC, "strategy": "local", "workers": 1,
                                         "out": str(tmp_path / "local")}), report=lambda rec: None)
        r = finished(deadline)

    out = work / "elastic"
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["epoch"]) == list(range(1, 7))
    sizes = list(metrics["world_size"])
    assert sizes[0] == 1 and sizes[-1] == 2 and sizes == sorted(sizes), sizes

    small, grown = attempts(r["gate_log"])
    assert {rec["world_size"] for rec in small} == {1}
    restored = [rec for rec in grown if rec["world_size"] == 1]
    assert restored and restored == small[:len(restored)]  # the grown group resumed a checkpoint
    assert [rec["epoch"] for rec in grown] == list(range(1, 7))
    assert len(r["workers"]) == 3  # one worker, then a group of two
    assert {a["node"] for a in r["workers"]} == {"n1", "n2"}

    model = load_model(out)
    assert list(model) == list(local.state_dict)
    assert max((model[k] - local.state_dict[k]).abs().max().item() for k in model) <= 1e-5
    assert metrics["train_loss"].tolist() == pytest.approx([m["train_loss"] for m in local.metrics],
                                                           rel=1e-5)


# --- `workers: [min, max]`: parsing and checks (no Ray) ------------------------------------------

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


def test_cli_range_for_ps_is_one_error(capsys):
    assert cli.main(["train", "--strategy", "ps", "--workers", "1-2"]) == 2
    assert capsys.readouterr().err == ("error: workers: got [1, 2]; a range [min, max] (elastic "
                                       "scaling) needs strategy ddp, not 'ps'\n")


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
