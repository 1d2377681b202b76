"""How ddp workers exchange what they learn: DDP communication hooks and local SGD.

`grad_compression` picks a hook from torch.distributed.algorithms.ddp_comm_hooks: `none`
(DDP's own all-reduce, as a Python hook so it can be timed), `fp16` / `bf16` (the bucket is
cast to half precision for the all-reduce) or `powersgd` (each gradient matrix all-reduced as
two rank-r factors P and Q; vectors uncompressed; error feedback keeps what was left out).

`local_sgd_steps` k > 1 is PyTorch's post-local SGD from its first step: every worker keeps
its own gradient, and a PeriodicModelAverager inside PostLocalSGDOptimizer all-reduces the
parameters after steps 0, k, 2k, ... (global step numbers, restored from checkpoints with the
optimizer state). The steps run under DDP's no_sync (`Comm.stepping`): torch's
post_localSGD_hook (`post_local_gradient_allreduce=False`, registered all the same) would hand
each gradient back untouched too, but only after DDP's reducer had copied it into its bucket
and back, ~10% of a step on 2 workers here (bench/profile_workers.py, BENCHMARKS.md P2).

bytes_per_step has the parameter server's meaning: all bytes the workers put on the wire for
one global batch. `Comm` counts the payload each step hands to all-reduce as it goes (the
bucket in the hook's wire dtype, PowerSGD's factors from its own state, local SGD's averaged
parameters); an all-reduce of P bytes over N workers moves 2(N-1)/N * P out of each worker
(gloo's ring: reduce-scatter, then all-gather), 2(N-1) * P in all. `bytes_per_step` below is
the same count as a formula, for `raydist plan` and the tests.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, post_localSGD_hook, powerSGD_hook
from torch.distributed.algorithms.model_averaging import averagers

from raydist.config import RunSpec
from raydist.registry import Registry

Hook = Callable[[Any, dist.GradBucket], torch.futures.Future]
Shapes = list[torch.Size]
# PowerSGD's error feedback and warm start need two plain all-reduce steps first (DDP rebuilds
# its buckets after step 1); 2 is the smallest value PowerSGDState accepts with them on.
POWERSGD_START = 2
POWERSGD_MIN_RATE = 2  # PowerSGDState's default: compress a matrix only if that halves it


@dataclass(frozen=True)
class Compression:
    hook: Callable[[RunSpec], tuple[Any, Hook]]
    """(state, hook) for DistributedDataParallel.register_comm_hook"""
    elements: Callable[[RunSpec, Shapes, int], tuple[int, int]]
    """(float32, 16-bit) elements one worker all-reduces at global step i"""
    wire_bytes: int = 4
    """bytes per element of a gradient bucket as the hook all-reduces it (0: it sends none)"""


COMPRESSIONS: Registry[Compression] = Registry("grad_compression")


def _plain(spec: RunSpec, shapes: Shapes, step: int) -> tuple[int, int]:
    return sum(s.numel() for s in shapes), 0


def _half(spec: RunSpec, shapes: Shapes, step: int) -> tuple[int, int]:
    return 0, sum(s.numel() for s in shapes)


def powersgd_elements(spec: RunSpec, shapes: Shapes, step: int) -> tuple[int, int]:
    """What powerSGD_hook all-reduces: each gradient seen as a shape[0] x rest matrix goes as
    P (n x r) and Q (m x r) when (n + m) * r * min_rate < n * m; the rest goes whole."""
    if step < POWERSGD_START:
        return _plain(spec, shapes, step)
    total = 0
    for s in shapes:
        n = s[0] if len(s) else 1
        m = s.numel() // n
        r = min(n, m, spec.powersgd_rank)
        total += (n + m) * r if (n + m) * r * POWERSGD_MIN_RATE < n * m else n * m
    return total, 0


def _powersgd_hook(spec: RunSpec) -> tuple[Any, Hook]:
    # Every rank draws the same initial Q from the same seed: the factors must agree.
    state = powerSGD_hook.PowerSGDState(
        process_group=None, matrix_approximation_rank=spec.powersgd_rank,
        start_powerSGD_iter=POWERSGD_START, min_compression_rate=POWERSGD_MIN_RATE,
        random_seed=spec.seed)
    return state, powerSGD_hook.powerSGD_hook


COMPRESSIONS.register("none")(Compression(lambda spec: (None, default_hooks.allreduce_hook), _plain))
COMPRESSIONS.register("fp16")(Compression(lambda spec: (None, default_hooks.fp16_compress_hook), _half, 2))
# DDP refuses bf16_compress_hook by its name unless CUDA and NCCL are there; gloo all-reduces
# bfloat16 as well (tests/test_comm.py), and Comm.timed registers it under another name.
COMPRESSIONS.register("bf16")(Compression(lambda spec: (None, default_hooks.bf16_compress_hook), _half, 2))
COMPRESSIONS.register("powersgd")(Compression(_powersgd_hook, powersgd_elements))


def _local_sgd_hook(spec: RunSpec) -> tuple[Any, Hook]:
    state = post_localSGD_hook.PostLocalSGDState(
        process_group=None, subgroup=None, start_localSGD_iter=0,
        post_local_gradient_allreduce=False)
    return state, post_localSGD_hook.post_localSGD_hook


def local_sgd_elements(spec: RunSpec, shapes: Shapes, step: int) -> tuple[int, int]:
    """The parameters, flattened and all-reduced after steps 0, k, 2k, ..."""
    return (_plain(spec, shapes, step) if step % spec.local_sgd_steps == 0 else (0, 0))


# its hook hands every gradient back untouched; the averager's parameters are counted instead
LOCAL_SGD = Compression(_local_sgd_hook, local_sgd_elements, wire_bytes=0)


def scheme(spec: RunSpec) -> Compression:
    """What the workers exchange: parameters every k steps (local SGD), else every step's
    gradients as grad_compression says (the two do not combine: RunSpec refuses that)."""
    return LOCAL_SGD if spec.local_sgd_steps > 1 else COMPRESSIONS[spec.grad_compression]


def make_hook(spec: RunSpec) -> tuple[Any, Hook]:
    """(state, hook) to register on the DDP model."""
    return scheme(spec).hook(spec)


def step_payload(spec: RunSpec, shapes: Shapes, step: int) -> int:
    """Bytes one worker hands to all-reduce at global step `step` (0-based), float32 model."""
    full, half = scheme(spec).elements(spec, shapes, step)
    return 4 * full + 2 * half


def bytes_per_step(spec: RunSpec, shapes: Shapes, world: int, first_step: int, steps: int) -> float:
    """All bytes on the wire per global step, averaged over steps first_step .. +steps-1."""
    payload = sum(step_payload(spec, shapes, i) for i in range(first_step, first_step + steps))
    return 2 * (world - 1) * payload / steps


class Comm:
    """The communication of one ddp worker: sets it up and meters it.

    wait_s (seconds, this worker) is communication not hidden behind the backward pass: from
    the moment the last gradient bucket reaches its hook (every gradient is computed by then)
    until its all-reduce, compression included, is done; with local SGD, the time spent
    averaging parameters. sent (bytes, this worker) is the payload handed to all-reduce."""

    def __init__(self, spec: RunSpec, model: nn.Module, world: int) -> None:
        self.spec, self.world = spec, world
        self.scheme = scheme(spec)
        self.shapes = [p.shape for p in model.parameters() if p.requires_grad]
        self.wait_s, self.sent = 0.0, 0

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Local SGD's optimizer; call before loading a checkpoint into it (its state_dict
        carries the averager's step)."""
        if self.spec.local_sgd_steps == 1 or self.world == 1:
            return optimizer
        # Imported here: torch.distributed.optim pulls in FSDP (over a second), and every
        # RunSpec validation imports this module for its registry.
        from torch.distributed.optim import PostLocalSGDOptimizer

        return PostLocalSGDOptimizer(optimizer, TimedAverager(self.spec.local_sgd_steps, self))

    def attach(self, replica: nn.Module) -> None:
        """Register the hook on the DDP model (one worker has none: nothing to send)."""
        if self.world == 1:
            return
        state, hook = make_hook(self.spec)
        replica.register_comm_hook(state, self.timed(hook))

    def stepping(self, replica: nn.Module) -> contextlib.AbstractContextManager:
        """Around an epoch's steps: local SGD's steps under DDP's no_sync (its reducer then does
        nothing between averages; the averager still averages every k steps)."""
        if self.spec.local_sgd_steps > 1 and self.world > 1:
            return replica.no_sync()
        return contextlib.nullcontext()

    def timed(self, hook: Hook) -> Hook:
        # No annotations on `run`: DDP compares them with the real classes, and this module's
        # are strings (from __future__ import annotations).
        def run(state, bucket):
            before = getattr(state, "total_numel_after_compression", None)
            start = time.perf_counter()
            fut = hook(state, bucket)
            self.sent += self.payload(state, bucket, before)
            if not bucket.is_last():
                return fut

            def done(fut: torch.futures.Future) -> torch.Tensor:
                self.wait_s += time.perf_counter() - start
                return fut.value()

            return fut.then(done)

        return run

    def payload(self, state: Any, bucket: dist.GradBucket, before: int | None) -> int:
        """Bytes the hook has just handed to all-reduce: PowerSGD counts what it all-reduced
        (its factors and the uncompressed tensors) once it compresses; otherwise the bucket."""
        after = getattr(state, "total_numel_after_compression", None)
        if after is not None and after != before:
            return 4 * (after - before)
        return self.scheme.wire_bytes * bucket.buffer().numel()

    def take(self) -> tuple[int, float]:
        """(bytes sent, seconds waited) since the last call."""
        out = (self.sent, self.wait_s)
        self.sent, self.wait_s = 0, 0.0
        return out


class TimedAverager(averagers.PeriodicModelAverager):
    """PyTorch's periodic averager (every `period` steps from step 0), timed into `comm`."""

    def __init__(self, period: int, comm: Comm) -> None:
        super().__init__(period=period, warmup_steps=0)
        self.comm = comm

    def average_parameters(self, params: Any) -> None:
        averaging = self.step >= self.warmup_steps and (self.step - self.warmup_steps) % self.period == 0
        params = list(params)
        start = time.perf_counter()
        super().average_parameters(params)
        self.comm.wait_s += time.perf_counter() - start
        if averaging:
            self.comm.sent += sum(4 * p.numel() for group in params for p in _tensors(group))


def _tensors(item: Any) -> list[torch.Tensor]:
    """A parameter, or a parameter group's parameters (PostLocalSGDOptimizer passes groups)."""
    return item["params"] if isinstance(item, dict) else [item]
