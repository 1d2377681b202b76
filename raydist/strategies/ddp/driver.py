"""`ddp`: N replicas on Ray Train; every step all-reduces the gradients (DistributedDataParallel).

Each worker runs the engine's own epoch loop on its shard of every global batch. The engine
divides a worker's loss sum by global_batch / world, so DDP's gradient average is the
single-process gradient of the global batch: the run follows `local` to float32 round-off.
grad_compression and local_sgd_steps change what the workers exchange (raydist/comm.py); each
epoch's record says how many bytes that was and how long rank 0 waited for it.

Rank 0 sends each epoch's record to a small channel actor; the driver runs TorchTrainer.fit()
in a background thread and hands the records to `report` in the calling thread as they come
(Ray Tune's report must run in the trial's own thread). Every epoch ends in a checkpoint, so a
restarted worker group, or a new run with the same `out`, continues from the latest one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist
import yaml
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    CheckpointUploadMode,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchConfig, TorchTrainer, get_device, prepare_model
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raydist import checkpoint, cluster, comm, faults
from raydist.config import ConfigError, RunSpec
from raydist.data import Dataset, load_data
from raydist.engine import Diverged, Record, Report, RunResult, fit, global_batches, make_optimizer
from raydist.models import build_model
from raydist.optim import OPTIMIZERS

STATE = "state.pt"  # the file inside every Ray Train checkpoint
# Settings a resumed run may change: none of them changes the trajectory beyond round-off.
RESUMABLE = ("epochs", "workers", "threads_per_worker", "address", "use_gpu", "max_failures",
             "bucket_cap_mb", "out")
POLL_S = 0.2  # how often the driver collects records
RAY_CALL_S = 60.0  # bound on any single call to the channel actor
STOP_WAIT_S = 60.0  # how long an interrupted driver waits for the workers to stop
# A worker group that cannot start (Ray Train waits 60 s each time) is retried this often,
# then the run fails instead of waiting forever.
START_RETRIES = 2
# How often an elastic run asks whether the cluster's size changed. Ray Train's autoscaling
# coordinator refreshes its view of the nodes every 20 s anyway; a resize restarts the group.
ELASTIC_CHECK_S = 20.0


class Stopped(Exception):
    """The driver asked the workers to stop (its `report` raised, or it was interrupted)."""


# --- checks before anything runs ---------------------------------------------------------------

def check(spec: RunSpec, data: Dataset) -> None:
    w = spec.max_workers
    if OPTIMIZERS[spec.optimizer].full_batch:
        if data.n_train < w:  # gd: the whole set is split as evenly as possible
            raise ConfigError(f"workers: got {spec.workers}; {spec.optimizer} splits the "
                              f"{data.n_train} training samples over the workers, so at most "
                              f"{data.n_train}")
        return
    # An elastic group may run at any size in its range; the batch splits evenly at each of
    # them, so every size follows the same (local's) trajectory and a resize is seamless.
    step = math.lcm(*range(spec.min_workers, w + 1))
    if spec.batch_size % step:
        sizes = (f"workers ({w})" if isinstance(spec.workers, int) else
                 f"every worker count in {spec.workers} (elastic), i.e. by {step}")
        raise ConfigError(f"batch_size: got {spec.batch_size}; the global batch must divide by "
                          f"{sizes}, e.g. {max(step, spec.batch_size // step * step)}")


def check_last_batch(spec: RunSpec, data: Dataset) -> None:
    """The engine cannot train on an empty shard. Checked after the cluster check, so that a
    run that can never fit hears that first."""
    last = data.n_train % spec.batch_size
    if not OPTIMIZERS[spec.optimizer].full_batch and 0 < last < spec.max_workers:
        raise ConfigError(f"batch_size: got {spec.batch_size}; the last batch of each epoch holds "
                          f"{last} of the {data.n_train} training samples, fewer than workers "
                          f"({spec.max_workers})")


# --- the driver --------------------------------------------------------------------------------

def run(spec: RunSpec, report: Report) -> RunResult:
    cluster.connect(spec)
    # by default on GPUs when the cluster has some now (not merely could scale to some: an
    # autoscaler's GPU node type must not turn every run into a GPU run)
    use_gpu = spec.use_gpu if spec.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    per_worker = {"CPU": float(spec.threads_per_worker), **({"GPU": 1.0} if use_gpu else {})}
    cluster.require(spec.min_workers * per_worker["CPU"],
                    spec.min_workers * per_worker.get("GPU", 0.0), f"ddp with {spec.workers} workers")
    data = load_data(spec)
    check_last_batch(spec, data)
    spec = absolute_paths(spec)
    storage = Path(spec.out) / "ray"
    claim(storage, spec)
    # On the driver's own node: a channel on a worker node would die with it, and with it a run
    # that Ray Train could otherwise restart from its checkpoint.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    channel = Channel.options(scheduling_strategy=here).remote()
    cluster.start_train_coordinator()  # ready before the controller asks for it
    trainer = TorchTrainer(
        worker_loop,
        # The driver's data travels with the job: workers need neither the data file nor the
        # libraries that load it (importing scikit-learn for digits costs seconds per worker).
        train_loop_config={"spec": spec, "data": data, "channel": channel,
                           "fault": os.environ.get("RAYDIST_FAULT")},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers(spec), use_gpu=use_gpu,
                                     resources_per_worker=per_worker,
                                     elastic_resize_monitor_interval_s=ELASTIC_CHECK_S),
        run_config=RunConfig(
            name="ddp", storage_path=str(storage),
            failure_config=FailureConfig(max_failures=spec.max_failures,
                                         controller_failure_limit=START_RETRIES),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING")))
    try:
        out = deliver(trainer, channel, report).return_value
    finally:
        ray.kill(channel)
    if out["diverged"]:
        raise Diverged(out["diverged"])
    return RunResult(out["history"], {k: torch.tensor(v) for k, v in out["state"].items()})


def num_workers(spec: RunSpec) -> int | tuple[int, int]:
    """A fixed count, or (min, max): Ray Train's elastic policy starts the group with as many
    workers as the cluster holds and restarts it, bigger or smaller, from the latest
    checkpoint when nodes come or go."""
    return spec.workers if isinstance(spec.workers, int) else (spec.min_workers, spec.max_workers)


def absolute_paths(spec: RunSpec) -> RunSpec:
    """Workers run in another directory (Ray Train moves them into its own): they get the output
    folder as an absolute path, and the spec a resumed run is compared with names the data
    file absolutely too."""
    name, sep, arg = spec.data.partition(":")
    data = f"{name}:{Path(arg).resolve()}" if sep and Path(arg).exists() else spec.data
    return dataclasses.replace(spec, out=str(Path(spec.out).resolve()), data=data)


def claim(storage: Path, spec: RunSpec) -> None:
    """An output folder holds one ddp run: its spec.yaml is checked against this spec."""
    path = storage / "spec.yaml"
    if path.exists():
        checkpoint.check_resumable("ddp", spec.out, yaml.safe_load(path.read_text()), spec.to_dict(),
                                   RESUMABLE)
    storage.mkdir(parents=True, exist_ok=True)
    spec.save(path)


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


# --- the workers -------------------------------------------------------------------------------

def worker_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """One replica: the engine's fit on this rank's shards; rank 0's return value reaches the
    driver as the result."""
    spec: RunSpec = config["spec"]
    channel = config["channel"]
    if config["fault"]:  # the test fault knob, forwarded from the driver's environment
        os.environ["RAYDIST_FAULT"] = config["fault"]
    quiet_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(spec.threads_per_worker)
    device = get_device()

    data = config["data"]
    model = build_model(spec, data)
    link = comm.Comm(spec, model, world)
    # local SGD wraps the optimizer before the checkpoint loads: its state holds the averager's step
    optimizer = link.wrap(make_optimizer(spec, model.parameters()))
    model.to(device)  # moves the parameters in place: the optimizer still holds them
    history = restore(model, optimizer)
    data = on_device(data, device)
    replica = prepare_model(model, move_to_device=False,
                            parallel_strategy_kwargs={"bucket_cap_mb": spec.bucket_cap_mb})
    link.attach(replica)
    steps = len(global_batches(spec, data, 1))  # the same every epoch
    stop = torch.zeros(1, device=device)

    def publish(rec: Record) -> None:
        rec.setdefault("world_size", world)  # an elastic group's size when it trained this epoch
        if "bytes_per_step" not in rec:  # a new epoch, not one replayed from a checkpoint
            rec.update(link.epoch_metrics((rec["epoch"] - 1) * steps, steps))
        if rank == 0:
            stop.fill_(float(ray.get(channel.put.remote(rec), timeout=RAY_CALL_S)))

    def all_reduce_sum(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.item()

    def on_epoch_end(rec: Record, hist: list[Record]) -> None:
        faults.maybe_fail(spec.out, rank, rec["epoch"])
        save_checkpoint(rec, hist, model, optimizer, rank)
        if world > 1:
            dist.broadcast(stop, src=0)  # every rank stops after the same epoch
        if stop.item():
            raise Stopped

    for rec in history:  # a resumed run reports its earlier epochs too
        publish(rec)
    try:
        history = fit(spec, data, replica, optimizer, publish, rank=rank, world=world,
                      history=history, reduce=all_reduce_sum if world > 1 else float,
                      on_epoch_end=on_epoch_end)
    except Diverged as e:  # every rank sees the same all-reduced loss, so all stop here
        return {"diverged": str(e)}
    except Stopped:
        return None
    return {"diverged": None, "history": history,
            "state": {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}}


def quiet_reports() -> None:
    """Ray Train 2.60 logs every report at INFO under a logger named by its file path, which
    LoggingConfig does not reach; keep the console for the per-epoch progress lines."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def on_device(data: Dataset, device: torch.device) -> Dataset:
    if device.type == "cpu":
        return data
    tensors = ("x_train", "y_train", "x_val", "y_val")
    return dataclasses.replace(data, **{k: getattr(data, k).to(device) for k in tensors})


def save_checkpoint(rec: Record, history: list[Record], model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, rank: int) -> None:
    """Every rank reports (Ray Train pairs the reports up); rank 0 attaches the checkpoint.
    Uploads run in the background: Ray Train's report queue holds one entry until the
    controller polls it, and training should not wait for that."""
    report = {"checkpoint_upload_mode": CheckpointUploadMode.ASYNC}
    if rank != 0:
        ray.train.report(rec, **report)
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "epoch": rec["epoch"], "history": history, "rng": rng_states()}
    folder = tempfile.mkdtemp(prefix="raydist_ckpt_")  # Ray deletes it after the upload
    torch.save(state, Path(folder) / STATE)
    ray.train.report(rec, checkpoint=Checkpoint.from_directory(folder),
                     delete_local_checkpoint_after_upload=True, **report)


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[Record]:
    """Load the latest checkpoint Ray Train registered, if any; returns its history."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return []
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / STATE, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])  # casts its tensors to the params' device
    set_rng_states(state["rng"])
    return state["history"]


def rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
