"""The driver of a run on Ray Train: TorchTrainer over `worker.loop`, and the records on their way.

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
from ray.train import (
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
    UserCallback,
)
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raydist.config import RunSpec
from raydist.data import Dataset, load_data
from raydist.engine import Diverged, Report, RunResult, announce, restart_line
from raydist.raytrain import STORAGE, Recipe
from raydist.raytrain.worker import RAY_CALL_S, loop
from raydist.runtime import connect, ray_compat
from raydist.runtime.channel import Channel
from raydist.runtime.faults import Faults
from raydist.runtime.stall import Stalled, Watchdog

POLL_S = 0.2  # how often the driver collects records
STOP_WAIT_S = 60.0  # how long a driver whose report failed waits for the workers to stop
INTERRUPT_WAIT_S = 20.0  # the same after Ctrl-C or SIGTERM: the command ends within 30 s
ABORT_WAIT_S = 30.0  # how long a stalled run waits for Ray Train to abort its worker group
# A worker group that cannot start (Ray Train waits 60 s each time) is retried this often,
# then the run fails instead of waiting forever.
START_RETRIES = 2
# How often an elastic run asks whether the cluster's size changed. Ray Train's autoscaling
# coordinator refreshes its view of the nodes every 20 s anyway; a resize restarts the group.
ELASTIC_CHECK_S = 20.0


def run(spec: RunSpec, report: Report, recipe: Recipe) -> RunResult:
    """The recipe's workers on Ray Train; rank 0 returns the final model under local's keys."""
    import torch

    connect.connect(spec)
    spec = absolute_paths(spec)  # the workers run in Ray Train's own folder
    channel = open_channel()  # rank 0's records, to this process as they come
    trainer = torch_trainer(spec, load_data(spec), channel, recipe)  # N x worker.loop
    try:
        out = deliver(trainer, channel, report, recipe.name, Watchdog(spec.stall_timeout_s)).return_value
    finally:
        ray.kill(channel)
    if out["diverged"]:
        raise Diverged(out["diverged"])
    return RunResult(out["history"], {k: torch.tensor(v) for k, v in out["state"].items()})


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


def torch_trainer(spec: RunSpec, data: Dataset, channel: Any, recipe: Recipe) -> TorchTrainer:
    need = recipe.per_worker(spec, ray.cluster_resources().get("GPU", 0.0))
    gpu = "GPU" in need
    connect.start_train_coordinator()  # ready before the controller asks for it
    return ray_compat.torch_trainer_class()(
        loop,
        **streams(data),
        # The driver's data travels with the job: workers need neither the data file nor the
        # libraries that load it (importing scikit-learn for digits costs seconds per worker).
        train_loop_config={"spec": spec, "data": data, "channel": channel, "faults": Faults.of(spec),
                           "replica": recipe.replica},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=recipe.num_workers(spec), use_gpu=gpu,
                                     resources_per_worker=need,
                                     elastic_resize_monitor_interval_s=ELASTIC_CHECK_S),
        run_config=RunConfig(
            name=recipe.name, storage_path=str(Path(spec.out) / STORAGE),
            failure_config=FailureConfig(max_failures=spec.max_failures,
                                         controller_failure_limit=START_RETRIES),
            callbacks=[Watch(channel, spec.max_failures, recipe.name), ray_compat.controller_to(channel)],
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


def deliver(trainer: TorchTrainer, channel: Any, report: Report, name: str = "raytrain",
            watch: Watchdog | None = None) -> Any:
    """Run fit() in a background thread; call `report` here, once per epoch, in order. A record
    seen again after a restart from an earlier checkpoint is not reported twice. The thread says
    it is done through an Event: a Thread.join that Ctrl-C interrupted may later claim the thread
    ended while it still runs (CPython 3.11). `watch`: rank 0's step beats, the records and the
    restarts feed it; when it fires, Ray Train's controller aborts the worker group."""
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def fit_in_background() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=fit_in_background, name=f"{name}-fit", daemon=True).start()
    reported = 0
    try:
        while True:
            finished = done.wait(POLL_S)
            for kind, item in ray.get(channel.take.remote(), timeout=RAY_CALL_S):
                if watch is not None:
                    heard(watch, kind, item)
                if kind == "restart":
                    announce(restart_line(*item))
                elif kind == "record" and item["epoch"] > reported:
                    report(item)
                    reported = item["epoch"]
            if finished:
                break
            if watch is not None:
                watch.check()
    except Stalled:
        abort(channel, done)
        raise
    except BaseException as e:
        # The workers stop at the end of their epoch; the caller's error wins.
        interrupted = isinstance(e, KeyboardInterrupt)
        with contextlib.suppress(Exception):
            ray.get(channel.stop.remote(), timeout=RAY_CALL_S)
            done.wait(INTERRUPT_WAIT_S if interrupted else STOP_WAIT_S)
            if interrupted:  # where the run stopped: after the epochs the workers finished meanwhile
                ended = [item["epoch"] for kind, item in ray.get(channel.take.remote(), timeout=RAY_CALL_S)
                         if kind == "record"]
                e.epoch = max([reported, *ended]) + 1  # type: ignore[attr-defined]
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def heard(watch: Watchdog, kind: str, item: Any) -> None:
    """A beat is a step (rank 0 measured the longest since its last beat), a record progress, a
    restart line a new worker group starting."""
    if kind == "beat":
        watch.step(item)
    elif kind == "record":
        watch.alive()
    else:
        watch.restart()


def abort(channel: Any, done: threading.Event) -> None:
    """Ray Train's controller aborts its worker group (the workers and their placement group go)
    and ends; fit() then returns in its thread, waited for at most ABORT_WAIT_S."""
    with contextlib.suppress(Exception):
        controller = ray.get(channel.controller.remote(), timeout=RAY_CALL_S)
        if controller is not None:
            ray.get(controller.abort.remote(), timeout=ABORT_WAIT_S)
    done.wait(ABORT_WAIT_S)


class Watch(UserCallback):
    """In Ray Train's controller: each failure of the worker group that Ray Train restarts
    becomes one restart line (through the channel, to the driver's console). Ray Train restores
    the latest checkpoint it has registered: the one of the last report seen here."""

    def __init__(self, channel: Any, max_failures: int, name: str = "ddp") -> None:
        self.channel, self.max_failures, self.name = channel, max_failures, name
        self.epoch = self.failures = 0

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if checkpoint is not None:
            self.epoch = metrics[0]["epoch"]

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        self.failures += 1
        if self.failures > self.max_failures:  # Ray Train ends the run: its error says so
            return
        died = sorted(r for r, e in worker_exceptions.items() if ray_compat.train_worker_died(e))
        rank = (died or sorted(worker_exceptions))[0]
        how = "died" if died else f"failed ({type(worker_exceptions[rank]).__name__})"
        self.channel.restart.remote(self.failures, self.max_failures, rank, how, self.epoch + 1,
                                    self.name)
