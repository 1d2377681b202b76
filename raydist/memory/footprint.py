"""Predicted bytes per worker: the primitives each strategy's own formula is written with
(raydist/strategies/<name>/cost.py, `worker_bytes`): what `raydist plan` prints beside its step
times, and what the pre-flight checks a run's `memory_per_worker` against (one function for both).

A worker's bytes are its model state (parameters P, gradients G = P, optimizer state O: the
optimizer registry's bytes per parameter byte, raydist/optim, e.g. adam 2, momentum 1, sgd 0;
buffers replicated everywhere) and the activations it keeps for the backward pass: a_j, the
bytes per sample block j keeps (what autograd saves in its forward, counted on one sample: the
attention scores and the MLP's hidden layer included), summed over the worker's blocks and times
the samples it holds. Measured peaks also hold the Python and torch runtime, the data set and
the step's transient buffers. raydist has no activation checkpointing: all of a step's
activations are kept. N workers (a pipeline: stages), global batch B, b = ceil(B / N); each
strategy's cost.py docstring gives its formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raydist.config import ConfigError, RunSpec
from raydist.models.blocks import blocks_of
from raydist.optim import OPTIMIZERS


@dataclass(frozen=True)
class Sizes:
    """A model's bytes as the predictions need them, per pipeline block (a parameter two blocks
    share counts in the first)."""

    params: list[int]
    """bytes of each block's parameters"""
    state: list[float]
    """optimizer-state bytes of each block's parameters"""
    out: list[int]
    """a_j: bytes per sample each block keeps for the backward pass (what autograd saves)"""
    sharded: list[int]
    """bytes of each block's parameters tensor parallelism splits"""
    buffers: int = 0
    optimizer: str = "adam"
    tensors: tuple[tuple[int, float], ...] = ()
    """(bytes, optimizer-state bytes) of each parameter tensor: how ps splits them over servers"""


@dataclass(frozen=True)
class Layout:
    """How a run spreads: N workers (pipeline: stages) and what else decides their bytes (each
    strategy's worker_bytes reads the fields it needs)."""

    n: int
    batch: int
    microbatches: int = 4
    schedule: str = "gpipe"
    virtual_stages: int | None = None
    """a pipeline's chunks per actor (None: its schedule's own number)"""
    servers: int = 1
    shard_optimizer: bool = False
    cuts: tuple[int, ...] | None = None
    """a pipeline's cuts as the spec gives them (used only where they make its N stages)"""

    @classmethod
    def of(cls, spec: RunSpec, count: str = "workers") -> Layout:
        """The spec's layout; N is the knob `count` (its strategy's COUNT: workers, at most
        their elastic range's top, or stages)."""
        n = spec.max_workers if count == "workers" else getattr(spec, count)
        return cls(n, spec.global_batch, spec.microbatches, spec.schedule, spec.virtual_stages,
                   spec.servers, bool(getattr(spec, "shard_optimizer", False)),
                   tuple(spec.cuts) if spec.cuts else None)


@dataclass(frozen=True)
class Worker:
    role: str
    state: float
    """bytes of model state: parameters, gradients, optimizer state, buffers"""
    activations: float
    """bytes of activations kept for the backward pass (see the module)"""

    @property
    def total(self) -> float:
        return self.state + self.activations


def sizes_of(model: nn.Module, name: str, optimizer: str, x: torch.Tensor) -> Sizes:
    """The Sizes of `model` (named `name`, for its pipeline blocks) under `optimizer`, its
    activations from one sample `x`; a model without blocks is one block."""
    try:
        blocks = blocks_of(model, name)
        seq, key = blocks.seq, blocks.model_key
    except ConfigError:
        seq, key = nn.Sequential(model), lambda k: k.partition(".")[2]
    entry, seen = OPTIMIZERS[optimizer], set()
    params, state, sharded, tensors = [], [], [], []
    for j, (child, block) in enumerate(seq.named_children()):
        # named as in the model (muon tells its hidden matrices by name), each tensor once
        mine = [(key(f"{child}.{n}"), p) for n, p in block.named_parameters() if id(p) not in seen]
        ids = {id(p) for _, p in mine}
        seen |= ids
        tensors += [(p.numel() * p.element_size(), entry.state_bytes(n, p)) for n, p in mine]
        params.append(sum(b for b, _ in tensors[len(tensors) - len(mine):]))
        state.append(sum(o for _, o in tensors[len(tensors) - len(mine):]))
        inner = 0 < j < len(seq) - 1
        sharded.append(sum(p.numel() * p.element_size() for m in block.modules()
                           if inner and isinstance(m, nn.Linear) for p in m.parameters(recurse=False)
                           if id(p) in ids))
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return Sizes(params, state, block_out(seq, x), sharded, buffers, optimizer, tuple(tensors))


def block_out(seq: nn.Sequential, x: torch.Tensor) -> list[int]:
    """Bytes per sample each block keeps for its backward pass: the tensors autograd saves in its
    forward on one sample `x` (its batch of 1), each once, the parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in seq.parameters()}
    out, x = [], x.clone()  # a sample of the data set shares its storage: its own
    for block in seq:
        saved: dict[tuple[int, int], int] = {}

        def pack(t: torch.Tensor, saved: dict[tuple[int, int], int] = saved) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in params:  # a view of a tensor: counted once
                saved[t.data_ptr(), t.numel()] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = block(x.detach().requires_grad_(x.is_floating_point()))
        out.append(sum(saved.values()) // len(x))
        x = y.detach()
    return out


def held(s: Sizes) -> float:
    """P + G + O of the whole model."""
    return 2 * sum(s.params) + sum(s.state)


def worst(workers: list[Worker]) -> Worker | None:
    """The worker that needs the most model state (None: the layout cannot run, e.g. more
    pipeline stages than blocks)."""
    return max(workers, key=lambda w: (w.state, w.activations)) if workers else None
