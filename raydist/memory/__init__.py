"""What a training process holds: its model state counted from tensor storages, and the peak
of its memory. Every strategy reports these in its records (engine/record.py:
model_state_bytes, optimizer_state_bytes, peak_rss_bytes, peak_gpu_bytes).

Model state is counted from the storages the process owns, each once: a parameter and a view
of it count once, a DTensor (FSDP2's shard, tensor parallelism's) counts its local shard, so
a sharded worker's figure is what it actually holds, not the full model's.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this process (the full tensor lives nowhere)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in nested optimizer state (dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def storage_bytes(tensors: Iterable[torch.Tensor], seen: set[int] | None = None) -> int:
    """Bytes of the distinct storages behind `tensors` (`seen`: storages already counted)."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        s = _local(t).untyped_storage()
        if s.data_ptr() in seen or s.nbytes() == 0:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def optimizer_tensors(optimizer: Any) -> Iterator[torch.Tensor]:
    """The tensors of an optimizer's state on this process. torch's ZeroRedundancyOptimizer
    keeps this rank's share in the optimizer it wraps (`.optim`)."""
    inner = getattr(optimizer, "optim", None)
    if isinstance(inner, torch.optim.Optimizer):
        optimizer = inner
    yield from _tensors(dict(optimizer.state))


def state_bytes(model: torch.nn.Module, optimizer: Any = None) -> dict[str, int]:
    """{'model_state_bytes': parameters + buffers + gradients + optimizer state,
    'optimizer_state_bytes': the optimizer's share of it} on this process."""
    seen: set[int] = set()
    params = list(model.parameters())
    weights = storage_bytes([*params, *model.buffers()], seen)
    grads = storage_bytes([p.grad for p in params if p.grad is not None], seen)
    opt = storage_bytes(optimizer_tensors(optimizer), seen) if optimizer is not None else 0
    return {"model_state_bytes": weights + grads + opt, "optimizer_state_bytes": opt}


def peak_rss_bytes() -> int:
    """The process's peak resident memory since it started (ru_maxrss: KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_gpu_bytes() -> int | None:
    """torch.cuda.max_memory_allocated on this process's device; None without CUDA."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated())


def measure(model: torch.nn.Module, optimizer: Any = None) -> dict[str, int]:
    """One process's memory fields for the record (peak_gpu_bytes only on a GPU)."""
    gpu = peak_gpu_bytes()
    return {**state_bytes(model, optimizer), "peak_rss_bytes": peak_rss_bytes(),
            **({"peak_gpu_bytes": gpu} if gpu is not None else {})}


def worst(per_worker: list[dict[str, int]]) -> dict[str, int]:
    """The record's fields: each the maximum over the workers that reported it."""
    keys = {k for m in per_worker for k in m}
    return {k: max(m[k] for m in per_worker if k in m) for k in sorted(keys)}


PER_WORKER = "per_worker_memory"
"""The record's key for each worker's own fields (engine/record.py): outputs.py writes them to
memory.csv beside metrics.csv, and strips them from every flat table and report."""
def record_fields(named: dict[str, dict[str, int]]) -> dict[str, Any]:
    """What a strategy puts in its epoch's measurements, given each worker's `measure` by name
    ('rank 0', 'replica 1', 'server 0', 'stage 1'): the maxima, and the per-worker list."""
    return {**worst(list(named.values())),
            PER_WORKER: [{"worker": name, **m} for name, m in named.items()]}


def gib(nbytes: float) -> str:
    """Bytes as the messages and tables write them: '3.1 GiB', '512.0 MiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes:.0f} B"
