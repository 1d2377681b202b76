"""What a tp worker holds of the model, as plain data and back, and the gradient average over
its data-parallel peers.

A split parameter (and the optimizer state beside it) is a DTensor: this rank's shard and how
it lies in the whole (`placements`). A checkpoint holds each rank's own shards (`to_plain`), in
its own file, which only that rank of a group of the same shape reads back (`from_plain`); the
whole model is gathered only for model.pt (plan.full_state)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from raydist.engine.levers import local  # a DTensor's shard, a plain tensor itself

KEY = "dtensor"  # a split tensor in a checkpoint: {KEY: shard, "placements": [["shard", 0]]}


def to_plain(obj: Any) -> Any:
    """`obj` (a state_dict, an optimizer's) with every DTensor as its local shard and placements."""
    if hasattr(obj, "placements"):
        return {KEY: obj.to_local().detach().clone(), "placements": [placement(p) for p in obj.placements]}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_plain(v) for v in obj)
    return obj


def placement(p: Any) -> list[Any]:
    if p.is_shard():
        return ["shard", p.dim]
    if p.is_replicate():
        return ["replicate"]
    raise ValueError(f"a tp checkpoint holds shards and replicas only, not {p}")


def from_plain(obj: Any, mesh: Any) -> Any:
    """to_plain's inverse: DTensors on the tensor-parallel `mesh` again."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if isinstance(obj, dict) and KEY in obj:
        places = [Shard(p[1]) if p[0] == "shard" else Replicate() for p in obj["placements"]]
        return DTensor.from_local(obj[KEY], mesh, places, run_check=False)
    if isinstance(obj, dict):
        return {k: from_plain(v, mesh) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(from_plain(v, mesh) for v in obj)
    return obj


def averager(optimizer: torch.optim.Optimizer, group: Any, size: int) -> Callable[[], None]:
    """What the engine's step calls before the gradient's norm and the optimizer step: each
    gradient becomes the mean over the `size` ranks of the data-parallel `group` (what DDP's
    all-reduce does, in one flat buffer). The engine divides a group's loss by global_batch /
    size (engine.denominator), so the mean is the gradient of the global batch."""

    def average() -> None:
        grads = [local(p.grad) for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        flat = torch.cat([t.reshape(-1) for t in grads])
        dist.all_reduce(flat, group=group)
        flat /= size
        with torch.no_grad():
            for t, avg in zip(grads, flat.split([t.numel() for t in grads]), strict=True):
                t.copy_(avg.view_as(t))

    return average
