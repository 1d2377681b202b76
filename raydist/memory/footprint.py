"""Predicted bytes per worker, per strategy: what `raydist plan` prints beside its step times,
and what the pre-flight checks a run's `memory_per_worker` against (one function for both).

A worker's bytes are its model state (parameters P, gradients G = P, optimizer state O: the
optimizer registry's bytes per parameter byte, raydist/optim, e.g. adam 2, momentum 1, sgd 0;
buffers replicated everywhere) and the activations it keeps for the backward pass: a_j, the
bytes per sample block j keeps (what autograd saves in its forward, counted on one sample: the
attention scores and the MLP's hidden layer included), summed over the worker's blocks and times
the samples it holds. Measured peaks also hold the Python and torch runtime, the data set and
the step's transient buffers. raydist has no activation checkpointing: all of a step's
activations are kept. N workers, global batch B, b = ceil(B / N):

- local     P + G + O + buffers;                              activations B
- ddp       P + G + O (shard_optimizer, ZeRO-1: O / N);       activations b
- fsdp      (P + G + O) / N + the largest block's P gathered (its other (N-1)/N); activations b
- tp        the sharded layers' P + G + O / N, the rest whole; activations B (every rank sees
            the whole batch). Sharded: the nn.Linear layers of every block between the first and
            the last (a transformer's attention and MLP pairs, as Megatron-LM splits them);
            embeddings, norms and the head stay replicated.
- ps        replica: P + G + buffers, activations b; server: P + O of the tensors it owns (split
            as the strategy splits them; the summed gradient is dropped after each step)
- pipeline  stage k: its blocks' P + G + O, and activations of the micro-batches it holds at
            once (counted from the schedule's op order: GPipe all M, 1F1B at most K - k), each
            of m = ceil(B / M) samples; the worst stage (the cuts: the strategy's default,
            balanced by parameters, or the spec's)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from raydist.config import ConfigError, RunSpec
from raydist.config.values import lookup
from raydist.memory import gib
from raydist.optim import OPTIMIZERS

# The strategies' own pure pieces (their cuts, schedules and server split), looked up by module
# path as config looks up registries: the engine's pre-flight, below the strategies, uses this.
CHUNKS = "raydist.strategies.pipeline.schedules:chunks_of"
SCHEDULES = "raydist.strategies.pipeline.schedules:SCHEDULES"
BLOCKS = "raydist.strategies.pipeline.cuts:blocks_of"
CUTS = "raydist.strategies.pipeline.cuts:balanced_cuts"
BALANCE = "raydist.strategies.ps.sharding:balance"


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
    """How a run spreads: N workers (pipeline: stages) and what else decides their bytes."""

    n: int
    batch: int
    microbatches: int = 4
    schedule: str = "gpipe"
    chunks: int = 1
    servers: int = 1
    shard_optimizer: bool = False
    cuts: tuple[int, ...] | None = None

    @classmethod
    def of(cls, spec: RunSpec, n: int | None = None) -> Layout:
        chunks_of = lookup(CHUNKS)
        count = spec.stages if spec.strategy == "pipeline" else spec.max_workers
        return cls(n or count, spec.global_batch, spec.microbatches, spec.schedule,
                   chunks_of(spec.schedule, spec.virtual_stages), spec.servers,
                   bool(getattr(spec, "shard_optimizer", False)),
                   tuple(spec.cuts) if spec.cuts and (n is None or n == spec.stages) else None)


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
        blocks = lookup(BLOCKS)(model, name)
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


def local(s: Sizes, lay: Layout) -> list[Worker]:
    return [Worker("rank 0", held(s) + s.buffers, lay.batch * sum(s.out))]


def ddp(s: Sizes, lay: Layout) -> list[Worker]:
    opt = sum(s.state) / (lay.n if lay.shard_optimizer else 1)
    return [Worker("rank", 2 * sum(s.params) + opt + s.buffers, math.ceil(lay.batch / lay.n) * sum(s.out))]


def fsdp(s: Sizes, lay: Layout) -> list[Worker]:
    gathered = max(s.params) * (lay.n - 1) / lay.n  # the rest of the largest block, while it computes
    return [Worker("rank", held(s) / lay.n + gathered + s.buffers,
                   math.ceil(lay.batch / lay.n) * sum(s.out))]


def tp(s: Sizes, lay: Layout) -> list[Worker]:
    share = [sh / p if p else 0.0 for sh, p in zip(s.sharded, s.params, strict=True)]
    split = sum(f * (2 * p + o) for f, p, o in zip(share, s.params, s.state, strict=True))
    return [Worker("rank", held(s) - split + split / lay.n + s.buffers, lay.batch * sum(s.out))]


def ps(s: Sizes, lay: Layout) -> list[Worker]:
    """Servers own whole tensors, split as the strategy splits them (largest first onto the
    least-loaded server); without per-tensor sizes, evenly."""
    replica = Worker("replica", 2 * sum(s.params) + s.buffers, math.ceil(lay.batch / lay.n) * sum(s.out))
    if not s.tensors:
        return [replica, Worker("server", (sum(s.params) + sum(s.state)) / lay.servers, 0.0)]
    owned = lookup(BALANCE)([b for b, _ in s.tensors], lay.servers)
    return [replica, *(Worker(f"server {i}", sum(sum(s.tensors[t]) for t in idx), 0.0)
                       for i, idx in enumerate(owned))]


def in_flight(schedule: str, stage: int, stages: int, m: int, chunks: int) -> int:
    """The most micro-batch chunks stage `stage` holds at once under `schedule`: forwards not yet
    through their backward (a split backward: their weight pass), counted along its ops."""
    entry, most, now = lookup(SCHEDULES)[schedule], 0, 0
    done = "W" if entry.split_backward else "B"
    for kind, _, _ in entry.ops(stage, stages, m, chunks):
        now += (kind == "F") - (kind == done)
        most = max(most, now)
    return most


def pipeline(s: Sizes, lay: Layout) -> list[Worker]:
    pieces = lay.n * lay.chunks
    if pieces > len(s.params):
        return []
    cuts = list(lay.cuts) if lay.cuts else lookup(CUTS)(s.params, pieces)
    bounds = [0, *cuts, len(s.params)]
    m = min(lay.microbatches, lay.batch)
    micro = math.ceil(lay.batch / m)
    workers = []
    for k in range(lay.n):
        mine = [(a, b) for j, (a, b) in enumerate(itertools.pairwise(bounds)) if j % lay.n == k]
        p = sum(sum(s.params[a:b]) for a, b in mine)
        o = sum(sum(s.state[a:b]) for a, b in mine)
        per_chunk = sum(sum(s.out[a:b]) for a, b in mine) / len(mine)
        held_now = in_flight(lay.schedule, k, lay.n, m, lay.chunks)
        workers.append(Worker(f"stage {k}", 2 * p + o, held_now * micro * per_chunk))
    return workers


FOOTPRINTS: dict[str, Callable[[Sizes, Layout], list[Worker]]] = {
    "local": local, "ddp": ddp, "fsdp": fsdp, "tp": tp, "ps": ps, "pipeline": pipeline}
"""Each strategy's workers' predicted bytes (the module docstring gives every formula)."""

SHARDING = ("fsdp", "tp", "pipeline")
"""The strategies that split the model state over their workers (the refusal names them)."""
WHAT = {"ddp": "parameters, gradients and {opt} state", "local": "parameters, gradients and {opt} state",
        "fsdp": "its shard of parameters, gradients and {opt} state, and the largest block gathered",
        "tp": "its shards of the split layers, the rest whole, with {opt} state",
        "ps": "a replica's parameters and gradients, or a server's share with {opt} state",
        "pipeline": "a stage's parameters, gradients and {opt} state"}


def worst(strategy: str, s: Sizes, lay: Layout) -> Worker | None:
    """The worker that needs the most model state (None: the layout cannot run, e.g. more
    pipeline stages than blocks)."""
    workers = FOOTPRINTS[strategy](s, lay)
    return max(workers, key=lambda w: (w.state, w.activations)) if workers else None


def refusal(spec: RunSpec, s: Sizes, budget: float, registered: list[str]) -> str | None:
    """The pre-flight's line when the spec's worst worker's model state exceeds `budget`."""
    w = worst(spec.strategy, s, Layout.of(spec)) if spec.strategy in FOOTPRINTS else None
    if w is None or w.state <= budget:
        return None
    what = WHAT[spec.strategy].format(opt=spec.optimizer)
    if spec.strategy in SHARDING:
        hint = f"{'more stages' if spec.strategy == 'pipeline' else 'more workers'} shard it further"
    else:
        others = [name for name in SHARDING if name in registered]
        hint = f"{' or '.join([', '.join(others[:-1]), others[-1]] if len(others) > 1 else others)} shard it"
    return f"{spec.strategy} needs {gib(w.state)} per worker ({what}), budget {gib(budget)}; {hint}"
