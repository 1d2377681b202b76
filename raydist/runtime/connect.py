"""Where a run executes: the Ray the caller started, the cluster named by `spec.address` /
RAY_ADDRESS, the local Ray `raydist ray start` keeps (raydist/runtime/local_ray.py), or an embedded
one started here."""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

from raydist import AUTH_MODE, LOCAL_RAY, local_ray_file  # noqa: F401 (LOCAL_RAY: API)
from raydist.config import ConfigError, RunSpec, load_yaml
from raydist.config.values import PROBE_S, cluster_address, host_port
from raydist.errors import Unreachable
from raydist.runtime import interrupts, ray_compat

# Ray Train's controller polls its workers every 2 s by default; 0.2 s cuts ~6 s off each fit().
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


API_SERVER = "RAY_API_SERVER_ADDRESS"


PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
GCS_WAIT = "RAY_gcs_server_port_wait_time_s"
GCS_TRIES = 1
"""ray.init's tries at a cluster's GCS once its port answers (connect.gcs_tries)."""


def connect(spec: RunSpec, cpus: float = 0.0, what: str = "the run") -> None:
    """Join the Ray the caller already started, the named cluster, or start an embedded one.
    `address="local"` never joins somebody else's cluster by accident. An embedded Ray offers
    the machine's cores, or the `cpus` the run asks for if that is more: logical CPUs only place
    processes, and on a laptop a run's processes may share its cores (said in one line)."""
    if ray.is_initialized():
        return
    address, field = cluster_address(spec.address)
    if address and address != "local":
        join(address, field)
    elif address == "local" or not join_local_head():
        start_local(num_cpus=embedded_cpus(cpus, what))


def join(address: str, field: str = "address") -> None:
    """ray.init(address), bounded: where nothing answers, ray.init retries for minutes (20 tries,
    each a 5 s connect and a 30 s wait for the cluster's id, Ray 2.60), so the address is first
    probed (PROBE_S); what Ray itself then refuses (a port that answers but is no Ray head, a
    token it does not take) is one line as well. "auto" is Ray's own look-up of this machine's
    `ray start`, quick where it finds none."""
    reachable(address, field)
    try:
        with gcs_tries(GCS_TRIES):
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, TimeoutError) as e:
        raise Unreachable(f"{field}: cannot join the Ray cluster at {address}: "
                          f"{first_line(e)}") from None
    interrupts.reassert()


@contextmanager
def gcs_tries(tries: int) -> Iterator[None]:
    """ray.init's tries at a GCS (Ray 2.60 reads RAY_gcs_server_port_wait_time_s as their count
    when a driver joins; default 20, ~40 s each where a port answers but no GCS does): `tries`,
    unless the user set it. Only for this call: a head this process starts later reads it too."""
    if GCS_WAIT in os.environ:
        yield
        return
    os.environ[GCS_WAIT] = str(tries)
    try:
        yield
    finally:
        os.environ.pop(GCS_WAIT, None)


def reachable(address: str | None, field: str = "address") -> None:
    """Unreachable, in one line, where nothing answers at `address` within PROBE_S; "auto" and
    "local" (this machine's Ray, a fresh one) and None (none named) pass."""
    if address and address not in ("auto", "local"):
        probe(address, field)


def probe(address: str, field: str) -> None:
    """A TCP connection to the cluster's port (GCS, or a Ray Client server) within PROBE_S, at
    the host Ray itself would use: a loopback name stands for this node's address, where a
    head's GCS listens."""
    host, port = host_port(address.removeprefix("ray://"))  # type: ignore[misc]  (checked)
    if host in ("localhost", "127.0.0.1", "::1") and not address.startswith("ray://"):
        host = ray.util.get_node_ip_address()
    try:
        socket.create_connection((host, port), timeout=PROBE_S).close()
    except OSError as e:
        why = (e.strerror or str(e) or type(e).__name__).lower()
        raise Unreachable(f"{field}: nothing answers at {address} ({why}; raydist waits up to "
                          f"{PROBE_S:g} s); is a Ray cluster running there?") from None


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
    with ray_compat.agent_port(free_port("0.0.0.0")):  # not 52365, which another Ray may hold
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, logging_level=logging.WARNING, configure_logging=True,
                 **init)
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


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now (loopback by default)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
