"""Where a run executes: an embedded local Ray by default, or the cluster named by
`spec.address` / RAY_ADDRESS; and the check that a run can ever fit there, counting the nodes
an autoscaler may still add."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import re
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import jsonschema
import ray

from raydist import AUTH_MODE, LOCAL_RAY, local_ray_file  # noqa: F401 (LOCAL_RAY: API)
from raydist.config import ConfigError, RunSpec, load_yaml
from raydist.runtime import interrupts, ray_compat

# Ray Train's controller polls its workers every 2 s by default; 0.2 s cuts ~6 s off each fit().
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Cloud nodes take minutes to boot; Ray Train gives a worker group 60 s to start by default, and a
# ddp run that waits for the autoscaler would fail after a few of those.
NODE_START_S = 600
API_SERVER = "RAY_API_SERVER_ADDRESS"
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def connect(spec: RunSpec, cpus: float = 0.0, what: str = "the run") -> None:
    """Join the Ray the caller already started, the named cluster, or start an embedded one.
    `address="local"` never joins somebody else's cluster by accident. An embedded Ray offers
    the machine's cores, or the `cpus` the run asks for if that is more: logical CPUs only place
    processes, and on a laptop a run's processes may share its cores (said in one line)."""
    if ray.is_initialized():
        return
    address = spec.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        interrupts.reassert()
        return
    if not join_local_head():
        start_local(num_cpus=embedded_cpus(cpus, what))


# --- the local Ray `raydist ray start` keeps (raydist/runtime/local_ray.py) ----------------------------

def alive(pid: int) -> bool:
    """Whether process `pid` runs and is this user's."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    proc = Path(f"/proc/{pid}")  # Linux: whose it is (root may signal anyone's)
    return not proc.exists() or proc.stat().st_uid == os.getuid()


def local_head() -> dict[str, Any] | None:
    """The head `raydist ray start` keeps, if it runs: named by this user's own file (owned by
    this user, writable by no one else), at an address of this machine (Ray's GCS listens on the
    node's address, which Ray resolves 127.0.0.1 to), its keeper this user's live process."""
    path = local_ray_file()
    try:
        st = path.stat()
        info = load_yaml(path) if st.st_uid == os.getuid() and not st.st_mode & 0o022 else {}
    except (OSError, ConfigError):
        return None
    host = str(info.get("address", "")).rpartition(":")[0]
    pid = info.get("pid")
    here = host in ("127.0.0.1", "localhost") or host == ray.util.get_node_ip_address()
    return info if here and isinstance(pid, int) and alive(pid) else None


def join_local_head() -> bool:
    """Join the local Ray `raydist ray start` keeps, saying so; False if none runs."""
    head = local_head()
    if head is None:
        return False
    print(f"note: joining the local Ray at {head['address']} that `raydist ray start` keeps "
          f"(pid {head['pid']}); `raydist ray stop` ends it", file=sys.stderr, flush=True)
    os.environ[API_SERVER] = head["api_server"]
    os.environ[AUTH_MODE] = str(head.get("auth_mode", "token"))  # the head's, not this shell's
    ray.init(address=head["address"], logging_level=logging.WARNING)
    interrupts.reassert()
    return True


def embedded_cpus(cpus: float, what: str) -> int:
    """The logical CPUs an embedded Ray offers: the machine's cores, or `cpus` if `what` asks for
    more, said in one line (its processes then share the cores)."""
    cores = os.cpu_count() or 1
    if cpus > cores:
        print(f"note: {what} asks for {cpus:g} CPUs and this machine has {cores} cores; the "
              "embedded Ray offers that many, so its processes share the cores", file=sys.stderr)
    return max(cores, math.ceil(cpus))


def gpus_now() -> float:
    """The GPUs the connected cluster has now."""
    return float(ray.cluster_resources().get("GPU", 0.0))


def start_local(**init: Any) -> None:
    """An embedded Ray (`address="local"`) with its dashboard on loopback. Ray Train frees the
    workers of a run whose controller died once the State API (served by the dashboard) shows
    it dead; without a dashboard its cleaner fails and warns every second. Naming the API
    server keeps its queries from guessing among other Ray instances on the machine: Ray's
    processes inherit the variable from this one. The driver keeps it afterwards (later runs
    in this process talk to this Ray).

    One embedded node is never drained or preempted, so Ray Train's preemption watcher, an actor
    process started beside every worker group just as its workers begin to train, has nothing to
    watch: it is switched off here (set before ray.init, so Tune trial processes inherit it too)."""
    port = free_port()
    os.environ[API_SERVER] = f"http://127.0.0.1:{port}"
    os.environ.setdefault(PREEMPTION_WATCHER, "0")
    ray_compat.quiet_token_auth_notice()  # authentication stays on
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, logging_level=logging.WARNING, configure_logging=True, **init)
    interrupts.reassert()


def start_train_coordinator() -> None:
    """Start Ray Train's autoscaling coordinator now, from the driver. Ray Train's controller
    creates this named, detached actor on its first use and waits (up to 5 s) for its reply before
    it starts any worker; started here, while the controller's own process still starts and imports
    torch, it is ready by then. On a fresh embedded Ray it also takes a worker process that Ray
    prestarted for the driver, which the controller's children (they carry its runtime_env) cannot
    use. Ray Train's own function, so name and options match and Ray Train finds this one."""
    if ray.util.client.ray.is_connected():  # a Ray Client driver: leave it to Ray Train
        return
    ray_compat.start_autoscaling_coordinator()


def whoami() -> tuple[str, int]:
    """This actor's id and process id, for its driver to name it to the user if it dies."""
    return ray.get_runtime_context().get_actor_id(), os.getpid()


def dead_actor(e: BaseException) -> str | None:
    """The id of the actor whose death `e` reports: its own call failed, or a call that read
    what it made (a RayTaskError whose cause is that death)."""
    for err in (getattr(e, "cause", None), e):
        if isinstance(err, ray.exceptions.RayActorError) and getattr(err, "actor_id", None):
            return err.actor_id
    return None


class Members:
    """An attempt's actors by id, each with its name for the user and its process id."""

    def __init__(self, fallback: str) -> None:
        self.fallback, self.names = fallback, {}

    def add(self, name: str, ident: tuple[str, int]) -> None:
        self.names[ident[0]] = (name, ident[1])

    def who(self, e: BaseException) -> str:
        """'ps replica 1 (pid 1234)', or the fallback if `e` names no actor of this attempt."""
        found = self.names.get(dead_actor(e))
        return f"{found[0]} (pid {found[1]})" if found else self.fallback


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now (loopback by default)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def capacity() -> dict[str, float]:
    """The most of each resource the cluster can ever offer: what it has now, or what its
    autoscaler can grow it to, whichever is more (nodes an autoscaler has not started yet count)."""
    now, most = ray.cluster_resources(), autoscaler_max() or {}
    keys = {"CPU", "GPU"} | set(now) | set(most)
    return {k: max(float(now.get(k, 0.0)), float(most.get(k, 0.0))) for k in keys}


def autoscaler_max() -> dict[str, float] | None:
    """The autoscaler's maximum as Ray records it in the GCS (Ray Train checks its worker groups
    against the same record); None when there is no autoscaler or it recorded nothing. KubeRay
    records it; Ray 2.60's own autoscaler (`ray up`, `ray start --autoscaling-config`) does not,
    so the head publishes its config with `publish_max` after `ray start`."""
    return ray_compat.autoscaler_max_resources()


def require(cpus: float, gpus: float, what: str) -> None:
    """Fail at once if `what` needs more than the cluster can ever give (Ray would wait forever).
    On an autoscaling cluster "ever" includes the nodes the autoscaler may still add, and a
    run that fits may wait for them: Ray Train then gives its worker group NODE_START_S."""
    cap, scaling = capacity(), autoscaler_max() is not None
    limit = "can scale to at most" if scaling else "can provide at most"
    for kind, need in (("CPU", cpus), ("GPU", gpus)):
        if need > cap[kind]:
            raise ConfigError(f"{what} needs {need:g} {kind}s but the cluster {limit} {cap[kind]:g}")
    if scaling:
        # Ray Train passes it on from this process to its controller (ENV_VARS_TO_PROPAGATE)
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(NODE_START_S))


def publish_max(config: dict[str, Any]) -> dict[str, float]:
    """Record the autoscaler's limits from its config (the dict the head's autoscaler reads:
    available_node_types, head_node_type, max_workers) in the GCS of the connected cluster, where
    `autoscaler_max` and Ray Train look for them. Returns the maximum recorded."""
    record = limits_record(config)
    ray_compat.report_cluster_config(record)
    return max_resources(config)


def limits_record(config: dict[str, Any]) -> Any:
    """The autoscaler config as Ray's ClusterConfig record: each node type with its count range,
    and the cap that the top-level max_workers puts on each resource (`max_resources`)."""
    record = ray_compat.cluster_config_record()
    for name, node_type in config["available_node_types"].items():
        head = name == config["head_node_type"]
        group = record.node_group_configs.add(
            name=name, min_count=1 if head else node_type.get("min_workers", 0),
            max_count=1 if head else node_type["max_workers"])
        # the record holds whole units only: a fractional resource counts what is surely there
        group.resources.update({k: int(v) for k, v in node_type["resources"].items() if v >= 1})
    record.max_resources.update({k: int(v) for k, v in max_resources(config).items() if v >= 1})
    return record


# --- Ray's console output, into a file ---------------------------------------------------------

RAY_LOG = "ray.log"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
_logs: list[TextIO] = []
_logs_lock = threading.Lock()
_console: dict[logging.Handler, logging.Logger] = {}


class _Plain:
    """A file that drops the colour codes Ray puts around its prefixes."""

    def __init__(self, files: list[TextIO]) -> None:
        self.files = files

    def write(self, text: str) -> None:
        for f in self.files:
            f.write(ANSI.sub("", text))

    def flush(self) -> None:
        for f in self.files:
            f.flush()


def _to_files(data: dict[str, Any], ignore_prefix: bool) -> None:
    with _logs_lock:
        ray_compat.print_worker_batch(data, _Plain(_logs), ignore_prefix)
        for f in _logs:
            f.flush()


def _ray_loggers() -> list[logging.Logger]:
    named = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.split(".")[0] == "ray"]
    return [logging.getLogger("ray"), *named]


@contextlib.contextmanager
def ray_log(path: str | Path) -> Iterator[Path]:
    """While it is open, what Ray would print on this driver's console goes to `path` instead:
    the workers' forwarded output and the raylet's reports of dead workers (tracebacks, "actor
    died"), and the records of Ray's own loggers (Ray Train's, Tune's). raydist's lines (epochs,
    restarts, notes) stay on the console. Nested or concurrent uses each get everything."""
    path = Path(path)
    f = path.open("a", buffering=1)
    with _logs_lock:
        _logs.append(f)
        if len(_logs) == 1:
            ray_compat.route_worker_output(_to_files)
            _swap_console_handlers()
    to_file = logging.StreamHandler(_Plain([f]))
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("ray").addHandler(to_file)
    try:
        yield path
    finally:
        logging.getLogger("ray").removeHandler(to_file)
        with _logs_lock:
            _logs.remove(f)
            if not _logs:
                ray_compat.route_worker_output(None)
                for handler, log in _console.items():
                    log.addHandler(handler)
                _console.clear()
        f.close()


def _swap_console_handlers() -> None:
    """Take Ray's console handlers off its loggers (given back when the last log closes)."""
    for log in _ray_loggers():
        for handler in list(log.handlers):
            if getattr(handler, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__):
                log.removeHandler(handler)
                _console[handler] = log


# --- The cluster-launcher YAML (`ray up FILE`): is it valid, and how big can it grow? ---

def load_cluster_config(path: str | Path) -> dict[str, Any]:
    """The file as `ray up` sees it: merged with Ray's provider defaults and checked by Ray's own
    schema validation (offline: no cloud SDK, no credentials). Errors are one-line ConfigErrors."""
    raw = load_yaml(path)
    try:
        config = ray_compat.prepare_and_validate(copy.deepcopy(raw))
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "top level"
        raise ConfigError(f"{path}: {where}: {e.message.splitlines()[0]}") from None
    except KeyError as e:
        raise ConfigError(f"{path}: missing key {e}") from None
    except (ValueError, NotImplementedError, RuntimeError) as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    for name, node_type in config["available_node_types"].items():
        # Ray accepts this and the autoscaler would then never reach min_workers.
        if node_type["min_workers"] > node_type["max_workers"]:
            raise ConfigError(f"{path}: available_node_types.{name}: min_workers "
                              f"{node_type['min_workers']} > max_workers {node_type['max_workers']}")
    return config


def max_resources(config: dict[str, Any]) -> dict[str, float]:
    """The most of each resource the autoscaler can ever bring up: the head node, plus up to
    the top-level `max_workers` worker nodes, each type at most its own `max_workers`.
    Each resource is maximised on its own (the types with the most of it fill the cap first),
    so the CPU and GPU maxima may need different worker mixes and need not hold at once."""
    types = config["available_node_types"]
    for name, node_type in types.items():
        missing = [k for k in ("CPU", "GPU") if k not in node_type.get("resources", {})]
        if missing:
            # Ray learns an instance type's CPUs/GPUs from the cloud API at launch only.
            raise ConfigError(f"available_node_types.{name}: resources has no "
                              f"{' or '.join(missing)}; give both, e.g. resources: {{CPU: 8, GPU: 0}}")
    head = types[config["head_node_type"]]["resources"]
    keys = ["CPU", "GPU"] + sorted({k for t in types.values() for k in t["resources"]} - {"CPU", "GPU"})
    return {k: head.get(k, 0.0) + most_from_workers(types, config["max_workers"], k) for k in keys}


def most_from_workers(types: dict[str, Any], slots: int, key: str) -> float:
    """Greedy fill of `slots` worker nodes with the types richest in `key`: optimal, since every
    node costs one slot whatever its type."""
    total = 0.0
    for node_type in sorted(types.values(), key=lambda t: -t["resources"].get(key, 0)):
        n = min(node_type["max_workers"], slots)
        total += n * node_type["resources"].get(key, 0)
        slots -= n
    return float(total)


def check_cluster_file(path: str | Path) -> dict[str, float]:
    """`raydist cluster check FILE`: validate it and return its autoscaling maximum."""
    config = load_cluster_config(path)
    try:
        return max_resources(config)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
