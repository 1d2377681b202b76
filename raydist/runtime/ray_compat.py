"""Every private Ray API raydist uses, in one place. Written for Ray 2.60.0 and checked on import:
another version warns once, since any of these may have moved. Each function says why raydist
needs it; none of them has a public equivalent in 2.60."""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import ray
from ray._private.state import state as gcs_state

WRITTEN_FOR = "2.60.0"

if ray.__version__ != WRITTEN_FOR:
    warnings.warn(f"raydist's private Ray calls (raydist/runtime/ray_compat.py) were written for Ray "
                  f"{WRITTEN_FOR}, this is Ray {ray.__version__}", stacklevel=2)


def autoscaler_max_resources() -> dict[str, float] | None:
    """The autoscaler's maximum as Ray records it in the GCS (Ray Train checks its worker groups
    against the same record)."""
    return gcs_state.get_max_resources_from_cluster_config()


def report_cluster_config(record: Any) -> None:
    """Record an autoscaler.ClusterConfig in the connected cluster's GCS (what KubeRay does and
    Ray 2.60's own autoscaler does not)."""
    ray._private.worker.global_worker.gcs_client.report_cluster_config(record.SerializeToString())


def cluster_config_record() -> Any:
    """An empty autoscaler ClusterConfig protobuf (Ray's generated module)."""
    from ray.core.generated import autoscaler_pb2

    return autoscaler_pb2.ClusterConfig()


def prepare_and_validate(config: dict[str, Any]) -> dict[str, Any]:
    """A cluster-launcher config as `ray up` sees it: Ray's provider defaults merged in and its
    schema checked (offline). Raises what Ray raises."""
    from ray.autoscaler._private import util

    # prepare_config logs one INFO line per node type it fills in; not news to a user.
    logging.getLogger(util.__name__).setLevel(logging.WARNING)
    config = util.prepare_config(config)
    util.validate_config(config)
    return config


def start_autoscaling_coordinator() -> None:
    """Ray Train's (and Ray Data's) autoscaling coordinator: a named, detached actor its
    controller creates on first use, with the name and options it looks for."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    get_or_create_autoscaling_coordinator()


def quiet_train_reports() -> None:
    """Ray Train 2.60 logs every report at INFO under a logger named by its file path, which
    LoggingConfig does not reach."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"


def quiet_token_auth_notice() -> None:
    """Ray 2.60 turns token authentication on for a new local cluster and then logs a warning
    that tells the user how to switch it off. Authentication stays on; only that record of its
    module's logger is dropped (the logger is named by the private module's path)."""
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(getattr(f, "raydist", False) for f in log.filters):
        drop = logging.Filter()
        drop.filter = lambda record: TOKEN_NOTICE not in record.getMessage()  # type: ignore[method-assign]
        drop.raydist = True  # type: ignore[attr-defined]
        log.addFilter(drop)


# --- Ray's console output, sent to a file instead (raydist's own lines stay on the console) ---

def route_worker_output(write: Callable[[dict[str, Any], bool], None] | None) -> None:
    """The driver prints what its workers write (log_to_driver) and the raylet's error reports
    (a worker died, with its traceback) through one module function, `print_worker_logs(batch,
    file, ignore_prefix)`; both call sites look it up when they print. `write(batch,
    ignore_prefix)` takes its place; None puts Ray's own back."""
    from ray._private import worker

    original = getattr(worker, "_raydist_print_worker_logs", worker.print_worker_logs)
    worker._raydist_print_worker_logs = original
    if write is None:
        worker.print_worker_logs = original
        return
    worker.print_worker_logs = lambda data, print_file, ignore_prefix=False: write(data, ignore_prefix)


def print_worker_batch(data: dict[str, Any], file: Any, ignore_prefix: bool) -> None:
    """Ray's own formatting of one batch of worker lines: `(Class pid=N) line`."""
    from ray._private import worker

    getattr(worker, "_raydist_print_worker_logs", worker.print_worker_logs)(data, file, ignore_prefix)


def train_worker_died(e: BaseException) -> bool:
    """Whether Ray Train reports a worker's process as gone (its health check failed), as
    opposed to an exception its training function raised."""
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    return isinstance(e, WorkerHealthCheckFailedError)


@functools.cache
def torch_trainer_class() -> type:
    """Ray Train's TorchTrainer, less its DatasetsCallback when a run passes no datasets. Ray
    Train 2.60 adds that callback to every fit, and it starts a DatasetManager actor, one more
    Python process per fit (~0.8 s of a 10 s fit on 2 cores, measured), even when nothing will
    ever call get_dataset_shard. A run with datasets (streamed data) keeps it."""
    from ray.train.torch import TorchTrainer

    if not hasattr(TorchTrainer, "_create_default_callbacks"):  # Ray Train v1 (RAY_TRAIN_V2_ENABLED=0)
        return TorchTrainer
    from ray.train.v2._internal.callbacks import DatasetsCallback

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return Trainer


def record_head(address: str) -> str:
    """Write `address` (a head this process started) where Ray's job supervisor looks for the
    cluster a job's driver joins: `ray_current_cluster` in the head's temp dir, as `ray start`
    writes it. Without it the supervisor picks any GCS process it finds on the machine (pgrep),
    another user's included. Returns the file, for the head's keeper to remove at its end."""
    from ray._common.utils import get_ray_address_file

    temp_dir = ray._private.worker._global_node.get_temp_dir_path()
    ray._private.utils.write_ray_address(address, temp_dir)
    return get_ray_address_file(temp_dir)


def controller_to(channel: Any) -> Any:
    """A callback in Ray Train's controller that hands the controller's own actor handle to
    `channel.controller` when it starts: the driver runs fit() in a thread and Ray Train keeps
    the handle to itself, and aborting the controller (what Ray Train's own Ctrl-C handler does,
    `TrainController.abort`) is the one way to end a worker group that no longer answers.
    Ray Train 2.60's ControllerCallback is internal."""
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class HandOver(ControllerCallback):
        def after_controller_start(self, train_run_context: Any) -> None:
            channel.controller.remote(ray.get_runtime_context().current_actor)

    return HandOver()


def job_agent_ready() -> bool:
    """Whether this node's dashboard agent has registered, which Ray's job server needs before
    it takes a job (else "No available agent to submit job, please try again later" after 10 s):
    the key the job server itself reads (ray.dashboard.modules.job.job_head._fetch_agent_info)."""
    from ray._private.ray_constants import KV_NAMESPACE_DASHBOARD
    from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX
    from ray.experimental.internal_kv import _internal_kv_get

    key = f"{DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX}{ray.get_runtime_context().get_node_id()}"
    return _internal_kv_get(key, namespace=KV_NAMESPACE_DASHBOARD) is not None


@contextlib.contextmanager
def agent_port(port: int) -> Iterator[None]:
    """ray.init of a new local cluster with its dashboard agent's HTTP server on `port`, not on
    Ray 2.60's fixed 52365: ray.init takes no such argument (only `ray start
    --dashboard-agent-listen-port` does), so a second Ray on the machine found 52365 held and its
    job server handed jobs to the first Ray's agent ("No available agent to submit job"). Sets
    RayParams' field while ray.init builds it (ray._private.parameter.RayParams)."""
    from ray._private import parameter

    original = parameter.RayParams

    class WithAgentPort(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("dashboard_agent_listen_port", port)
            super().__init__(*args, **kwargs)

    parameter.RayParams = WithAgentPort
    try:
        yield
    finally:
        parameter.RayParams = original
