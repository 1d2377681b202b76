"""Multi-node scenarios, one after the other, on one private `ray.cluster_utils.Cluster` (a head
and worker nodes, all on this machine), in a process of its own: a process joins one Ray only,
and the test session already lives in its embedded one. tests/test_multinode.py runs it as

    RAY_TMPDIR=<private dir> python tests/multinode_driver.py CONFIG.json

CONFIG names the work folder and the runs: each a name, a scenario, the RunSpec fields and how
many worker nodes it starts with. Before a run, nodes join (or idle ones leave) until that many
are alive, so a run starts as if on a cluster of its own (one cluster start, not one per run).
Each run works in WORK/<name>; after each, the driver rewrites `result.json` (per run: where
every strategy actor ran, which node was lost, the records that reached the driver, or the
error that ended it), so a run that hangs leaves the earlier ones readable. A failed run does
not stop the next. The driver always shuts its cluster down, which stops only its own processes.

Scenarios:
- `loss`: after epoch `kill_after` (its checkpoint written and, for ddp, registered by Ray Train)
  the machine of one node that holds a strategy actor dies: its processes are killed, then the
  node is removed, and a replacement joins, as an autoscaler would bring one. (The undisturbed
  run it is compared with runs in the test's own embedded Ray.)
- `elastic`: ddp with workers [min, max] starts on too few nodes for max; after epoch `grow_after`
  a node joins and Ray Train's elastic policy restarts the group, bigger, from a checkpoint.
  Ray Train's autoscaling coordinator is started first, with a 1 s refresh instead of 20 s; it
  lives as long as the cluster, so an elastic run comes before any other ddp run on it.

ddp's rank 0 sends each record through a channel actor; here that is `Gate`, which also logs every
record it receives (a restarted group sends the epochs of its checkpoint again) and holds rank 0 at
one epoch until the driver or the grown group opens it, so that a run of a few small epochs cannot
end before the node event it is meant to meet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # inherited by every node
# These nodes are killed, never drained: Ray Train's preemption watcher (an actor process beside
# every worker group) would have nothing to see, as on the embedded Ray (raydist.runtime.connect).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (  # noqa: E402
    _AutoscalingCoordinatorActor,
)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402
from rayprocs import descendants  # noqa: E402

from raydist.config import RunSpec  # noqa: E402
from raydist.raytrain import driver as ddp  # noqa: E402  (Channel, ELASTIC_CHECK_S: patched here)
from raydist.train import train  # noqa: E402

NODE_ARGS = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
# A node whose processes are gone is declared dead after ~5 s instead of Ray's ~15 s; a raylet
# that merely lags on a busy machine (seconds, seen here) must not be.
FAST_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
# The actors a strategy starts, by class name; every other actor (Ray Train's controller, the
# channel, ...) is infrastructure that a lost node must not hold in these tests.
ACTORS = {"ddp": ("RayTrainWorker",), "ps": ("Replica", "Server"), "pipeline": ("Stage",)}
WAIT_S = 50.0  # below ddp.RAY_CALL_S: a held rank 0 must not time out its call to the channel
PROGRESS = Path(os.devnull)  # the work folder's progress.log: what a timed-out test shows


def note(what: str) -> None:
    with PROGRESS.open("a") as f:
        f.write(f"{time.strftime('%H:%M:%S')} {what}\n")


class Nodes:
    """The cluster and a short name for each node (head, n1, n2, ...) in the order they joined."""

    def __init__(self, workers: int) -> None:
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "object_store_memory": 80 * 2**20,
            "_system_config": FAST_DEATH})
        self.names = {self.cluster.head_node.node_id: "head"}
        self.count = 0
        for _ in range(workers):  # they start side by side
            self.add(wait=False)
        self.cluster.wait_for_nodes()

    def add(self, wait: bool = True) -> str:
        node = self.cluster.add_node(wait=wait, **NODE_ARGS)
        self.count += 1
        self.names[node.node_id] = f"n{self.count}"
        return self.names[node.node_id]

    def alive(self) -> list[str]:
        """The worker nodes in the cluster now, in the order they joined."""
        return sorted((self.names[n.node_id] for n in self.cluster.worker_nodes), key=lambda n: int(n[1:]))

    def idle(self) -> list[Any]:
        """The worker nodes that hold no live actor, in the order they joined."""
        busy = {a["node"] for a in actors().values() if a["state"] != "DEAD"}
        return sorted((n for n in self.cluster.worker_nodes if n.node_id not in busy),
                      key=lambda n: int(self.names[n.node_id][1:]))

    def resize(self, workers: int) -> None:
        """Add nodes, or remove the newest idle ones (the last run's actors may take a moment to
        go), until `workers` are alive."""
        while len(self.alive()) < workers:
            self.add()
        while len(self.alive()) > workers:
            wait_for("an idle worker node", self.idle)
            self.cluster.remove_node(self.idle()[-1])

    def kill(self, name: str) -> None:
        """The machine dies: every process of the node at once (its raylet's children, the
        workers, first: Cluster.remove_node alone leaves them running for a while). Returns once
        Ray has declared it dead: until then Ray may still place a restarted run's actors there
        (they die before they start and the run retries, a path these tests do not count)."""
        node = next(n for n in self.cluster.worker_nodes if self.names[n.node_id] == name)
        raylets = [p.process.pid for p in node.all_processes["raylet"]]
        for pid in descendants(raylets):
            os.kill(pid, signal.SIGKILL)
        self.cluster.remove_node(node, allow_graceful=False)
        wait_for(f"Ray to declare {name} dead", lambda: not any(
            n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()))

    def shutdown(self) -> None:
        self.cluster.shutdown()


def actors() -> dict[str, dict[str, Any]]:
    """Every actor the cluster has known, alive or dead, with its class and node. (The public
    State API needs the dashboard, which these small clusters go without.)"""
    return {k: {"class": v["ActorClassName"], "node": v["Address"]["NodeID"], "state": v["State"]}
            for k, v in ray._private.state.actors().items()}


def placements(nodes: Nodes, before: set[str], classes: tuple[str, ...] | None) -> list[dict[str, str]]:
    """The actors of `classes` (None: all) started since `before`, each with its node's name."""
    return [{"id": k, "class": a["class"], "node": nodes.names.get(a["node"], a["node"]), "state": a["state"]}
            for k, a in actors().items() if k not in before and (classes is None or a["class"] in classes)]


def victim(nodes: Nodes, classes: tuple[str, ...]) -> str:
    """A worker node that holds a live strategy actor and no other live actor but Ray Train's
    PreemptionWatcher (0 CPUs, anywhere; restarted elsewhere if its node dies)."""
    holds: dict[str, set[str]] = {}
    for a in actors().values():
        if a["state"] == "ALIVE":
            holds.setdefault(nodes.names.get(a["node"], "?"), set()).add(a["class"])
    ok = {*classes, "PreemptionWatcher"}
    found = sorted(n for n, c in holds.items() if n != "head" and c & set(classes) and c <= ok)
    if not found:
        raise RuntimeError(f"no node holds only strategy actors: {holds}")
    return found[0]


@ray.remote(num_cpus=0)
class Gate:
    """ddp's Channel (hello / put / restart / take / stop / beat / controller), logging every
    record and holding the first record of epoch `hold` until `open` is called or, with
    `until_world`, a record from a group of that size arrives (the held record is then dropped:
    the grown group trains that epoch again)."""

    def __init__(self, hold: int, log: str, until_world: int = 0) -> None:
        self.records: list[dict[str, Any]] = []
        self.stopping = False
        self.hold, self.log, self.until_world = hold, Path(log), until_world
        self.opened = asyncio.Event()
        self.held = False

    async def put(self, rec: dict[str, Any]) -> bool:
        with self.log.open("a") as f:
            f.write(json.dumps({**rec, "arrived": time.time()}) + "\n")
        if self.until_world and rec.get("world_size") == self.until_world:
            self.opened.set()
        if rec["epoch"] == self.hold and not self.opened.is_set() and not self.held:
            self.held = True
            try:
                await asyncio.wait_for(self.opened.wait(), WAIT_S)
            except asyncio.TimeoutError:  # the event never came: the test will say so
                pass
            else:
                if self.until_world:  # superseded by the grown group's own epoch
                    return self.stopping
        self.records.append(rec)
        return self.stopping

    async def take(self) -> list[tuple[str, Any]]:
        out, self.records = self.records, []
        return [("record", rec) for rec in out]

    async def hello(self, *args: Any) -> None:  # who is who, and ddp's restart line: not these
        pass                                      # tests' subject

    restart = hello

    async def beat(self, seconds: float) -> None:  # rank 0's steps, for the driver's watchdog
        pass

    async def controller(self, handle: Any = None) -> None:  # Ray Train's, for a stalled run's abort
        return None

    async def stop(self) -> None:
        self.stopping = True

    async def open(self) -> None:
        self.opened.set()

    async def is_held(self) -> bool:
        return self.held


class GateFactory:
    """Stands in for ddp.Channel, whose `.options(...).remote()` ddp.run calls; keeps the handle."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs, self.handle, self.placing = kwargs, None, {}

    def options(self, **placing: Any) -> GateFactory:
        self.placing = placing
        return self

    def remote(self) -> Any:
        self.handle = Gate.options(**self.placing).remote(**self.kwargs)
        return self.handle


class QuickCoordinator(_AutoscalingCoordinatorActor):
    """Ray Train's autoscaling coordinator, refreshing its view of the nodes every second
    instead of every 20 s: an elastic group then sees a new node in ~1 s."""

    TICK_INTERVAL_S = 1


def quick_coordinator() -> None:
    """Started under the name Ray Train looks up (with get_if_exists), before Ray Train does."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(QuickCoordinator).options(
        name="AutoscalingCoordinator", namespace="AutoscalingCoordinator", get_if_exists=True,
        lifetime="detached", scheduling_strategy=here).remote()


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def registered_epoch(out: Path) -> int:
    """The epoch of the latest checkpoint Ray Train's controller registered (it persists its
    checkpoint manager's state after each registration); 0 if none yet."""
    path = out / "ray" / "ddp" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(path.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return 0
    return int(latest["metrics"]["epoch"]) if latest else 0


def wait_for(what: str, ready: Any, timeout: float = WAIT_S) -> float:
    t = time.monotonic()
    while not ready():
        if time.monotonic() - t > timeout:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - t


def timed_train(spec: RunSpec, report: Any = lambda rec: None) -> float:
    def noted(rec: dict[str, Any]) -> None:
        note(f"{Path(spec.out).name}: epoch {rec['epoch']} reported")
        report(rec)

    note(f"{Path(spec.out).name}: {spec.strategy} starts")
    t = time.monotonic()
    train(spec, noted)
    note(f"{Path(spec.out).name}: done")
    return time.monotonic() - t


# --- scenarios -----------------------------------------------------------------------------------

def loss(nodes: Nodes, cfg: dict[str, Any]) -> dict[str, Any]:
    work = Path(cfg["work"])
    spec = RunSpec.from_dict({**cfg["spec"], "out": str(work / "lost_node")})
    classes, k = ACTORS[spec.strategy], cfg["kill_after"]
    log = work / "gate.jsonl"
    gate = GateFactory(hold=k + 1, log=str(log)) if spec.strategy == "ddp" else None
    if gate:
        ddp.Channel = gate
    reported: list[int] = []
    event: dict[str, Any] = {}

    def report(rec: dict[str, Any]) -> None:
        reported.append(rec["epoch"])
        if rec["epoch"] != k or event:
            return
        if gate:  # the group resumes from the checkpoint Ray Train registered
            event["registration_wait_s"] = wait_for(
                f"Ray Train to register epoch {k}", lambda: registered_epoch(Path(spec.out)) >= k)
            wait_for("rank 0 at the gate", lambda: ray.get(gate.handle.is_held.remote()))
        event["killed"] = victim(nodes, classes)
        event["alive_before"] = placements(nodes, before, classes)
        note(f"killing {event['killed']}")
        nodes.kill(event["killed"])
        event["replacement"] = nodes.add()
        note(f"{event['replacement']} joined")
        if gate:
            ray.get(gate.handle.open.remote())

    before = set(actors())
    seconds = timed_train(spec, report)
    return {"nodes_at_start": sorted(nodes.names.values()), "lost_node_s": seconds,
            "event": event, "reported": reported, "lost_node": placements(nodes, before, classes),
            "gate_log": read_log(log)}


def elastic(nodes: Nodes, cfg: dict[str, Any]) -> dict[str, Any]:
    work = Path(cfg["work"])
    spec = RunSpec.from_dict({**cfg["spec"], "out": str(work / "elastic")})
    ddp.ELASTIC_CHECK_S = 1.0
    quick_coordinator()
    log = work / "gate.jsonl"
    ddp.Channel = GateFactory(hold=cfg["grow_after"] + 1, log=str(log), until_world=spec.max_workers)
    event: dict[str, Any] = {}

    def report(rec: dict[str, Any]) -> None:
        if rec["epoch"] == cfg["grow_after"] and not event:
            event["added"] = nodes.add()
            note(f"{event['added']} joined")
            event["added_after_epoch"] = rec["epoch"]

    before = set(actors())
    seconds = timed_train(spec, report)
    return {"elastic_s": seconds, "event": event, "workers": placements(nodes, before, ACTORS["ddp"]),
            "gate_log": read_log(log)}


SCENARIOS = {"loss": loss, "elastic": elastic}


def run_one(nodes: Nodes, run: dict[str, Any], work: Path) -> dict[str, Any]:
    """One run in its own work folder, on exactly `run["nodes"]` worker nodes. The module settings
    a scenario patches (ddp's channel class, its elastic check interval) are put back after it."""
    cfg = {**run, "work": str(work / run["name"])}
    Path(cfg["work"]).mkdir(parents=True, exist_ok=True)
    saved = ddp.Channel, ddp.ELASTIC_CHECK_S
    result: dict[str, Any] = {}
    t = time.monotonic()
    try:
        nodes.resize(run["nodes"])
        result["workers_at_start"] = nodes.alive()
        note(f"{run['name']}: starts on {', '.join(result['workers_at_start'])}")
        before = set(actors())
        result.update(SCENARIOS[run["scenario"]](nodes, cfg))
        result["all_actors"] = placements(nodes, before, None)
    except BaseException:  # noqa: BLE001 - the test reads it from result.json
        result["error"] = traceback.format_exc()
        note(f"{run['name']}: failed")
    finally:
        ddp.Channel, ddp.ELASTIC_CHECK_S = saved
        result["run_s"] = time.monotonic() - t
    return result


def main(config_path: str) -> int:
    global PROGRESS
    cfg = json.loads(Path(config_path).read_text())
    work = Path(cfg["work"])
    PROGRESS = work / "progress.log"
    result: dict[str, Any] = {"runs": {}}
    out = work / "result.json"
    nodes = None
    t = time.monotonic()
    try:
        nodes = Nodes(cfg["runs"][0]["nodes"])
        result["cluster_start_s"] = time.monotonic() - t
        note("cluster up")
        ray.init(address=nodes.cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        for run in cfg["runs"]:
            result["runs"][run["name"]] = run_one(nodes, run, work)
            out.write_text(json.dumps(result, indent=1))
    except BaseException:  # noqa: BLE001 - the test reads it from result.json
        result["error"] = traceback.format_exc()
        note("failed")
    finally:
        ray.shutdown()
        if nodes is not None:
            nodes.shutdown()
        result["total_s"] = time.monotonic() - t
        out.write_text(json.dumps(result, indent=1))
    failed = "error" in result or any("error" in r for r in result["runs"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
