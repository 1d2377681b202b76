"""The per-epoch record: one schema for every strategy, each field with one meaning.

A record is a plain dict (it travels through Ray, Tune and pandas); `EpochRecord` is its type
and this module its documentation. `metrics.csv`, a sweep's `results.csv` and `raydist report`
use these names. Fields a strategy cannot measure are absent, never filled with another meaning.
"""

from __future__ import annotations

from typing import Any, TypedDict


class EpochRecord(TypedDict, total=False):
    epoch: int
    """1-based epoch number."""
    train_loss: float
    """mean per-sample training loss over the epoch (a sequence's: mean over its tokens)."""
    val_loss: float
    """mean per-sample loss on the validation split after the epoch."""
    val_accuracy: float
    """share of right predictions on the validation split (classification only)."""
    samples_per_s: float
    """training samples of the epoch / epoch_time_s."""
    epoch_time_s: float
    """wall seconds of the epoch's training steps (evaluation and checkpoint excluded)."""
    wall_time_s: float
    """wall seconds since the run started (a resumed run continues its first attempt's clock)."""
    global_batch: int
    """samples per optimizer step: batch_size, or batch_per_worker x the data-parallel replicas
    (gd: the whole training set)."""
    effective_lr: float
    """lr x the lr_scaling factor of global_batch / base_batch: the lr warmup rises to and the
    schedule starts from (engine/lr.py)."""
    world_size: int
    """processes that trained this epoch: ddp workers, ps replicas, pipeline stage actors
    (replicas x stages), tp workers (tp_size x data-parallel groups)."""
    grad_norm: float
    """local, ddp, fsdp, tp: the global 2-norm of the whole model's gradient before clipping (the
    gradient the optimizer steps on, after the data-parallel exchange), mean over the epoch's
    optimizer steps; measured whether clip_grad_norm is set or not (engine/levers.py)."""
    grad_norm_max: float
    """the largest of those norms in the epoch: a loss spike shows here first."""
    comm_wait_s: float
    """seconds of the epoch a training process spent waiting for communication instead of
    computing, mean over the processes: ddp, all-reduce not hidden behind the backward pass
    (local SGD: the averaging); ps, a replica's idle time between its gradients (weights in
    flight, servers stepping); pipeline, a stage's time in receives and sends (the bubble)."""
    bytes_per_step: float
    """bytes all processes put on the wire per global batch, counted as sent: ddp, the payload
    the communication hooks hand to gloo's ring all-reduce (each of N workers sends
    2(N-1)/N of it); ps, gradients up and weights down as the replicas measured them
    (discarded gradients included); pipeline, activations and their gradients between stages,
    and with replicas their gradients' all-reduce, counted as ddp counts it."""
    compute_s: float
    """ps: a replica's busy seconds in the epoch (mean over replicas)."""
    discarded: int
    """ps: gradients computed but dropped as too stale (async; their shards were recomputed; sync: 0)."""
    model_state_bytes: int
    """bytes of model state a worker holds (parameters, buffers, gradients, optimizer state),
    counted from the tensors' storages, each once (raydist/memory/): a shard counts as a shard.
    The maximum over the workers: ddp, fsdp and tp ranks, ps replicas and servers, pipeline stage
    actors, local's one process. Every strategy reports it, and the next three."""
    optimizer_state_bytes: int
    """the optimizer's share of model_state_bytes (ZeRO-1: the worker's share; the maximum over
    the workers)."""
    peak_rss_bytes: int
    """peak resident memory of a worker's process since it started (ru_maxrss), the maximum over
    the workers: it holds the runtime and the data too."""
    peak_gpu_bytes: int
    """on GPUs: torch.cuda.max_memory_allocated of a worker, the maximum over the workers."""
    per_worker_memory: list[dict[str, Any]]
    """each worker's own four fields above, with its name ('rank 0', 'replica 1', 'server 0',
    'stage 1'): written to memory.csv beside metrics.csv (columns epoch, worker, the fields),
    never to a flat table (metrics.csv, epochs.csv, results.csv) or to Tune (`scalars`)."""
    bubble_fraction: float
    """pipeline: share of the stage actors' epoch time not spent computing."""
    bubble_bound: float
    """pipeline: the schedule's ideal bubble, as a share of the stages' time, for equal stages and
    free communication: the bubble is (K-1)/(V*M) of the compute time (V chunks per actor: 1 but
    interleaved-1f1b), so (K-1)/(V*M+K-1); GPipe's and 1F1B's (K-1)/(M+K-1); ZB-H1's, with F, B
    and W of equal time, (K-1)/(3M+K-1)."""


PER_STAGE = {
    "stage{i}_compute_s": "pipeline: stage i's seconds of forward, backward and optimizer step "
                          "(with replicas: the mean over the replicas of stage i)",
    "stage{i}_comm_s": "pipeline: stage i's seconds waiting in receives, sends and the replicas' "
                       "all-reduce (mean over replicas)",
    "stage{i}_peak_activations": "pipeline: the most micro-batches (interleaved: micro-batch chunks) "
                                 "stage i held at once (the most over replicas)",
}
"""Per-stage fields of a pipeline record, one of each per stage i."""

Record = dict[str, Any]


def make_record(epoch: int, train_loss: float, val: Record, samples: int, epoch_time: float,
                wall_time: float, measured: Record | None = None) -> Record:
    """The fields every strategy gives, then the strategy's own measurements."""
    return {"epoch": epoch, "train_loss": train_loss, **val,
            "samples_per_s": samples / epoch_time, "epoch_time_s": epoch_time,
            "wall_time_s": wall_time, **(measured or {})}


PER_WORKER = "per_worker_memory"


def scalars(rec: Record) -> Record:
    """The record without its per-worker list: what a flat table, Tune or a tracker takes."""
    return {k: v for k, v in rec.items() if k != PER_WORKER}


def worker_rows(records: list[Record]) -> list[Record]:
    """memory.csv's rows: one per epoch per worker (epoch, worker, its fields)."""
    return [{"epoch": r["epoch"], **w} for r in records for w in r.get(PER_WORKER, [])]


def documented(key: str) -> bool:
    """Whether `key` is a field of the schema (a per-stage field for any stage included)."""
    if key in EpochRecord.__annotations__:
        return True
    stem, _, rest = key.partition("_")
    return stem.startswith("stage") and stem[5:].isdigit() and f"stage{{i}}_{rest}" in PER_STAGE
