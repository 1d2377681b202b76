"""The ddp driver: Ray Train's TorchTrainer over `worker.loop`, and the records on their way.

Rank 0 sends each epoch's record to a small channel actor; the driver runs TorchTrainer.fit()
in a background thread and hands the records to `report` in the calling thread as they come
(Ray Tune's report must run in the trial's own thread)."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from pathlib import Path
from typing import Any

import ray
from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raydist import cluster
from raydist.config import RunSpec
from raydist.data import Dataset
from raydist.engine import Record, Report
from raydist.faults import Faults
from raydist.strategies.ddp import num_workers, per_worker
from raydist.strategies.ddp.worker import RAY_CALL_S, loop

POLL_S = 0.2  # how often the driver collects records
STOP_WAIT_S = 60.0  # how long an interrupted driver waits for the workers to stop
# A worker group that cannot start (Ray Train waits 60 s each time) is retried this often,
# then the run fails instead of waiting forever.
START_RETRIES = 2
# How often an elastic run asks whether the cluster's size changed. Ray Train's autoscaling
# coordinator refreshes its view of the nodes every 20 s anyway; a resize restarts the group.
ELASTIC_CHECK_S = 20.0


def resources_per_worker(spec: RunSpec) -> dict[str, float]:
    return per_worker(spec, ray.cluster_resources().get("GPU", 0.0))


def absolute_paths(spec: RunSpec) -> RunSpec:
    """Workers run in another directory (Ray Train moves them into its own): they get the output
    folder and a data file as absolute paths."""
    name, sep, arg = spec.data.partition(":")
    data = f"{name}:{Path(arg).resolve()}" if sep and Path(arg).exists() else spec.data
    return dataclasses.replace(spec, out=str(Path(spec.out).resolve()), data=data)


def open_channel() -> Any:
    """On the driver's own node: a channel on a worker node would die with it, and with it a run
    that Ray Train could otherwise restart from its checkpoint."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Channel.options(scheduling_strategy=here).remote()


def torch_trainer(spec: RunSpec, data: Dataset, channel: Any) -> TorchTrainer:
    need = resources_per_worker(spec)
    gpu = "GPU" in need
    cluster.start_train_coordinator()  # ready before the controller asks for it
    return TorchTrainer(
        loop,
        **streams(data),
        # The driver's data travels with the job: workers need neither the data file nor the
        # libraries that load it (importing scikit-learn for digits costs seconds per worker).
        train_loop_config={"spec": spec, "data": data, "channel": channel, "faults": Faults.of(spec)},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers(spec), use_gpu=gpu,
                                     resources_per_worker=need,
                                     elastic_resize_monitor_interval_s=ELASTIC_CHECK_S),
        run_config=RunConfig(
            name="ddp", storage_path=str(Path(spec.out) / "ray"),
            failure_config=FailureConfig(max_failures=spec.max_failures,
                                         controller_failure_limit=START_RETRIES),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING")))


def streams(data: Dataset) -> dict[str, Any]:
    """A streamed set's Ray Data datasets, unsplit: every worker reads the epoch's whole stream
    in one order and keeps its part of each global batch (data/streamed.py says why)."""
    if not data.streamed:
        return {}
    return {"datasets": data.ray_datasets(),
            "dataset_config": DataConfig(datasets_to_split=[],
                                         execution_options=ExecutionOptions(preserve_order=True))}


def deliver(trainer: TorchTrainer, channel: Any, report: Report) -> Any:
    """Run fit() in a background thread; call `report` here, once per epoch, in order. A record
    seen again after a restart from an earlier checkpoint is not reported twice."""
    outcome: dict[str, Any] = {}

    def fit_in_background() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            outcome["error"] = e

    thread = threading.Thread(target=fit_in_background, name="ddp-fit", daemon=True)
    thread.start()
    reported = 0
    try:
        while True:
            thread.join(POLL_S)
            finished = not thread.is_alive()
            for rec in ray.get(channel.take.remote(), timeout=RAY_CALL_S):
                if rec["epoch"] > reported:
                    report(rec)
                    reported = rec["epoch"]
            if finished:
                break
    except BaseException:
        # The workers stop at the end of their epoch; the caller's error wins.
        with contextlib.suppress(Exception):
            ray.get(channel.stop.remote(), timeout=RAY_CALL_S)
            thread.join(STOP_WAIT_S)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@ray.remote(num_cpus=0)
class Channel:
    """Per-epoch records from rank 0 to the driver; the driver's request to stop, back."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.stopping = False

    def put(self, rec: Record) -> bool:
        self.records.append(rec)
        return self.stopping

    def take(self) -> list[Record]:
        out, self.records = self.records, []
        return out

    def stop(self) -> None:
        self.stopping = True
