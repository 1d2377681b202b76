"""Autoscaling: a sweep on Ray's fake multi-node cluster (RAY_FAKE_CLUSTER, provider
fake_multinode: worker "nodes" are extra raylets on this machine) whose head has no CPUs.
The sweep's ddp trial wants 2 workers of 1 CPU; its worker group's placement group is demand
the autoscaler sees, so both 1-CPU nodes are added, the trial completes, and the idle nodes are
removed after idle_timeout_minutes. The "can it ever fit" check consults the autoscaler's
maximum: it lets that trial through, and refuses 4 workers saying how far the cluster scales.

The head is ours (rayprocs: private temp dir, free ports, token) and is stopped by PID; the
sweep runs in a subprocess, since this pytest process holds the session's embedded Ray.
One small trial, not several: on a loaded 2-core machine every extra process (a trial driver,
a Ray Train controller, a worker importing torch, a node's raylet and agents) costs seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from ray.core.generated import autoscaler_pb2
from rayprocs import Head, new_head, processes_of

from raydist.config import ConfigError
from raydist.runtime import capacity, ray_compat

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKER_CPUS, MAX_WORKERS, IDLE_MINUTES = 1, 2, 0.1
MOST = WORKER_CPUS * MAX_WORKERS  # CPUs; the head has none
HEAD_TYPE = "ray.head.default"  # the type the fake provider gives the node `ray start` made
START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
MESSAGE = "ddp with {n} workers needs {n} CPUs but the cluster {limit} {cap}"

# A driver of our own on the cluster: first it records the autoscaler's limits in the GCS, as a
# cluster launcher's head start command would (Ray's own autoscaler records none), and tries
# the "can it ever fit" check against them; then it polls the alive worker nodes and the
# placement groups that want CPUs (ddp worker groups; Tune's trial groups hold trial_driver).
OBSERVE = textwrap.dedent("""
    import json, os, sys, time
    import ray
    from ray._private.state import state
    from raydist.runtime import capacity
    from raydist.config import ConfigError
    address, config, stop = sys.argv[1:]
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    before = state.get_max_resources_from_cluster_config()
    capacity.publish_max(json.load(open(config)))
    try:
        capacity.require(4, 0, "ddp with 4 workers")
        refused = None
    except ConfigError as e:
        refused = str(e)
    print(json.dumps({"before": before, "after": state.get_max_resources_from_cluster_config(),
                      "capacity": capacity.capacity(), "refused": refused}), flush=True)
    deadline = time.monotonic() + 300  # never outlive the test
    while not os.path.exists(stop) and time.monotonic() < deadline:
        nodes = sum(n["Alive"] for n in ray.nodes()) - 1
        groups = [g for g in ray.util.placement_group_table().values()
                  if g["state"] in ("PENDING", "CREATED")
                  and any(b.get("CPU", 0) for b in g["bundles"].values())]
        print(json.dumps({"t": time.time(), "workers": nodes, "groups": len(groups),
                          "pending": sum(g["state"] == "PENDING" for g in groups)}), flush=True)
        time.sleep(0.5)
""")
SWEEP = """
model: mlp
data: digits
hidden: [16]
epochs: 1
strategy: ddp
workers: 2
sweep:
  metric: val_loss
  scheduler: none
  max_concurrent: 1
  seeds: 1
"""


def fake_cluster(gcs_address: str) -> dict:
    """A complete autoscaling config: the wheel lacks fake_multi_node/example.yaml, which Ray
    would otherwise fill the defaults from."""
    empty = ("initialization_commands", "setup_commands", "head_setup_commands",
             "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
             "cluster_synced_files", "rsync_exclude", "rsync_filter")
    return {
        "cluster_name": "fake", "max_workers": MAX_WORKERS, "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_MINUTES,
        # gcs_address: without it the fake nodes join whatever GCS listens on port 6379
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": gcs_address},
        "head_node_type": HEAD_TYPE,
        "available_node_types": {
            HEAD_TYPE: {"resources": {"CPU": 0, "GPU": 0, "trial_driver": 2}, "node_config": {},
                     "max_workers": 0},
            "worker": {"resources": {"CPU": WORKER_CPUS, "GPU": 0}, "node_config": {},
                       "min_workers": 0, "max_workers": MAX_WORKERS}},
        "auth": {"ssh_user": "nobody"}, "docker": {}, "file_mounts": {},
        "file_mounts_sync_continuously": False, **{k: [] for k in empty},
    }


@contextmanager
def autoscaling_head() -> Iterator[tuple[Head, Path]]:
    """Our head with no CPUs and the fake autoscaler; stopped by PID. Yields it and its config."""
    head = new_head("rda")
    config = head.tmp / "autoscaling.json"
    config.write_text(json.dumps(fake_cluster(head.gcs_address)))
    try:
        # No dashboard: it and its dozen processes would slow a loaded machine down, and the
        # trials run to the end (the State API matters for trials stopped early).
        head.start("--num-cpus=0", '--resources={"trial_driver": 2}', f"--autoscaling-config={config}",
                   "--include-dashboard=false", timeout=90,
                   env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"})
        yield head, config
    finally:
        head.stop()


def run_logged(cmd: list[str], log: Path, env: dict[str, str], timeout: float) -> int:
    """Run `cmd` with its output in `log`, which a timeout shows the end of."""
    with log.open("w") as f:
        try:
            return subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise AssertionError(f"timed out after {timeout:.0f} s: {' '.join(cmd)}\n"
                                 + log.read_text()[-5000:]) from None


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def samples(path: Path) -> list[dict]:
    return [r for r in records(path) if "t" in r]


def wait_for(what: str, check: Callable[[], Any], timeout: float,
             why: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}\n{why()}"
        time.sleep(0.5)


# --- the check, without a cluster ------------------------------------------------------------

@pytest.fixture
def fake_ray(monkeypatch):
    """The cluster has `now`; its autoscaler records `most` (None: no autoscaler)."""
    monkeypatch.setenv(START_TIMEOUT, "")  # so that the test's end restores what was there
    monkeypatch.delenv(START_TIMEOUT)

    def install(now: dict, most: dict | None) -> None:
        monkeypatch.setattr(capacity.ray, "cluster_resources", lambda: now)
        monkeypatch.setattr(ray_compat.gcs_state, "get_max_resources_from_cluster_config", lambda: most)
    return install


@pytest.mark.unit
def test_require_counts_the_nodes_the_autoscaler_can_add(fake_ray):
    fake_ray({"trial_driver": 2.0}, {"CPU": 4, "trial_driver": 2})
    capacity.require(4, 0, "ddp with 4 workers")
    assert os.environ[START_TIMEOUT] == str(capacity.NODE_START_S)  # time for nodes to boot
    assert capacity.capacity() == {"CPU": 4.0, "GPU": 0.0, "trial_driver": 2.0}
    with pytest.raises(ConfigError) as e:
        capacity.require(8, 0, "ddp with 8 workers")
    assert str(e.value) == MESSAGE.format(n=8, limit="can scale to at most", cap=4)


@pytest.mark.unit
def test_require_counts_nodes_beyond_the_autoscalers_maximum(fake_ray):
    fake_ray({"CPU": 6.0, "GPU": 1.0}, {"CPU": 4, "GPU": 0})  # e.g. nodes joined by hand
    capacity.require(6, 1, "ddp with 6 workers")
    with pytest.raises(ConfigError) as e:
        capacity.require(6, 2, "ddp with 6 workers")
    assert str(e.value) == "ddp with 6 workers needs 2 GPUs but the cluster can scale to at most 1"


@pytest.mark.unit
def test_require_without_an_autoscaler_keeps_its_message(fake_ray):
    fake_ray({"CPU": 2.0}, None)
    capacity.require(2, 0, "ddp with 2 workers")
    assert START_TIMEOUT not in os.environ
    with pytest.raises(ConfigError) as e:
        capacity.require(4, 0, "ddp with 4 workers")
    assert str(e.value) == MESSAGE.format(n=4, limit="can provide at most", cap=2)


@pytest.mark.unit
def test_published_limits_read_back_through_rays_own_reader(monkeypatch):
    """publish_max's record, read by Ray (the same reader Ray Train's worker groups use): each
    node type up to its max_workers, all of them up to the top-level max_workers (3 here)."""
    config = {"max_workers": 3, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 2, "GPU": 0, "trial_driver": 8}, "max_workers": 0},
        "cpu": {"resources": {"CPU": 8, "GPU": 0}, "min_workers": 0, "max_workers": 2},
        "gpu": {"resources": {"CPU": 4, "GPU": 1}, "min_workers": 0, "max_workers": 2}}}
    record = autoscaler_pb2.ClusterConfig.FromString(capacity.limits_record(config).SerializeToString())
    monkeypatch.setattr(ray_compat.gcs_state, "get_cluster_config", lambda: record)
    assert capacity.autoscaler_max() == {"CPU": 2 + 2 * 8 + 4, "GPU": 2, "trial_driver": 8}
    assert capacity.max_resources(config) == {"CPU": 22.0, "GPU": 2.0, "trial_driver": 8.0}


# --- the sweep on the fake autoscaling cluster -----------------------------------------------

@pytest.mark.multinode
@pytest.mark.timeout(180)
def test_sweep_scales_the_cluster_up_and_down(tmp_path):
    out, stop, observed = tmp_path / "sweep", tmp_path / "stop", tmp_path / "observed.jsonl"
    (tmp_path / "sweep.yaml").write_text(SWEEP)
    t0 = time.monotonic()
    with autoscaling_head() as (head, config):
        with observed.open("w") as log:
            observer = subprocess.Popen(
                [sys.executable, "-c", OBSERVE, head.gcs_address, str(config), str(stop)],
                cwd=REPO, env=head.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for("the limits to be published", lambda: records(observed), 60,
                     lambda: observed.read_text()[-3000:])
            started = time.monotonic()
            env = {**head.env, "RAY_ADDRESS": head.gcs_address}
            code = run_logged([str(BIN / "raydist"), "sweep", str(tmp_path / "sweep.yaml"),
                               "--out", str(out)], tmp_path / "sweep.log", env, timeout=130)
            swept = time.monotonic()
            assert code == 0, (tmp_path / "sweep.log").read_text()[-5000:]
            # the nodes go once idle for idle_timeout_minutes (plus an autoscaler round or two)
            wait_for("the idle nodes to go", lambda: [s["workers"] for s in samples(observed)][-1:] == [0],
                     IDLE_MINUTES * 60 + 40, lambda: json.dumps(samples(observed)[-3:]))
            idled = time.monotonic()
        finally:
            stop.touch()
            try:
                observer.wait(timeout=20)
            except subprocess.TimeoutExpired:
                observer.kill()
    left = processes_of(str(head.tmp))  # after the head's stop: nothing of ours may be alive
    print(f"\nhead up and limits published {started - t0:.1f} s; sweep {swept - started:.1f} s; "
          f"nodes gone {idled - swept:.1f} s later; head stopped {time.monotonic() - idled:.1f} s later")

    published = records(observed)[0]
    assert published["before"] is None  # Ray's own autoscaler records no maximum
    assert published["after"] == {"CPU": MOST, "trial_driver": 2}
    assert published["capacity"]["CPU"] == MOST
    assert published["refused"] == MESSAGE.format(n=4, limit="can scale to at most", cap=MOST)

    results = pd.read_csv(out / "results.csv")
    assert list(results["status"]) == ["completed"] and list(results["epoch"]) == [1]

    seen = samples(observed)
    most = max(s["workers"] for s in seen)
    assert seen[0]["workers"] == 0 and most == MAX_WORKERS  # 2 workers need both nodes
    demand = next(s["t"] for s in seen if s["pending"])
    added = next(s["t"] for s in seen if s["workers"])
    all_up = next(s["t"] for s in seen if s["workers"] == most)
    last_busy = max(i for i, s in enumerate(seen) if s["groups"])
    idle = seen[last_busy + 1]["t"]
    removed = next(s["t"] for s in seen[last_busy + 1:] if s["workers"] == 0)
    print(f"autoscaling: {most} worker nodes at most; after the first pending worker group, the "
          f"first node {added - demand:.1f} s, all {all_up - demand:.1f} s; all gone "
          f"{removed - idle:.1f} s after the last worker group ended (idle_timeout "
          f"{IDLE_MINUTES * 60:.0f} s)")
    assert not left, f"processes of {head.tmp} still alive: {left}"
