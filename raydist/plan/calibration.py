"""Measuring what `raydist plan` predicts from (`Costs`), in fresh processes set up as workers
are (their niceness, their threads, the engine's own epoch loop), apart from the runs predicted.

- compute(b): seconds per step of engine.train_epoch (the gather of a shuffled real batch of b
  samples, forward, backward, optimizer step, per-step bookkeeping), one process alone, at
  every batch size the plan needs.
- s(c): c copies of that loop in c processes in lock-step (they wait for each other every step,
  as synchronous workers do), against one alone: how much slower each computes when c share a
  node.
- the optimizer step alone, each block's share of forward + backward, its parameters and output
  bytes, and the bytes of all gradients.

Or given (`from_flops`): a worker's rate in floating-point operations per second, and the
operations of a step counted, for a machine you cannot calibrate on.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import queue
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from raydist.config import ConfigError, RunSpec
from raydist.data import Dataset, batch_order
from raydist.engine import backward, global_batches, loss_fn, setup, train_epoch
from raydist.optim import OPTIMIZERS
from raydist.steptime import Costs
from raydist.strategies.pipeline.cuts import block_sizes, blocks_of

CONTENDED_TIMEOUT_S = 600.0
"""Bound on the concurrent calibration processes: a stuck one surfaces as an error."""


def per_node_count(spec: RunSpec, given: int | None) -> int:
    """The count given, checked, or as many workers as this machine's CPUs hold."""
    if given is not None and given < 1:
        raise ConfigError(f"workers_per_node: got {given}; expected an integer >= 1")
    return given or max(1, (os.cpu_count() or 1) // spec.threads_per_worker)


def grad_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def real_batches(data: Dataset, size: int, seed: int) -> Iterator[torch.Tensor]:
    """Shuffled full batches of `size` training samples, epoch after epoch, as the engine's loop
    draws them."""
    for epoch in itertools.count(1):
        yield from (b for b in batch_order(data.n_train, size, seed, epoch) if len(b) == size)


def step_time(model: nn.Module, optimizer: torch.optim.Optimizer, data: Dataset, size: int,
              seed: int, seconds: float = 0.0, steps: int = 0, sync: Callable[[], Any] | None = None,
              warmup: int = 2) -> float:
    """Seconds per step of engine.train_epoch on real batches of `size` samples, after `warmup`
    steps: `steps` of them, or as many as fill `seconds` (at least 3). `sync` runs after every
    step: c workers waiting for each other every step, as synchronous strategies do."""
    batches = real_batches(data, size, seed)
    train_epoch(model, optimizer, data, [next(batches) for _ in range(warmup)])
    done, start = 0, time.perf_counter()
    while done < steps if steps else done < 3 or time.perf_counter() - start < seconds:
        train_epoch(model, optimizer, data, [next(batches)])
        if sync:
            sync()
        done += 1
    return (time.perf_counter() - start) / done


@dataclass(frozen=True)
class Job:
    """What every calibration process is given."""

    spec: RunSpec
    seconds: float
    """time each measurement runs for"""
    niceness: int
    """the niceness workers run at (Ray's start at 15): other load takes the same share from both"""


def settle(job: Job) -> tuple[Dataset, nn.Sequential, torch.optim.Optimizer]:
    """A fresh calibration process set up as a worker is: its niceness, its threads, its model."""
    if job.niceness > os.nice(0):
        os.nice(job.niceness - os.nice(0))
    torch.set_num_threads(job.spec.threads_per_worker)
    data, model, optimizer = setup(job.spec)
    OPTIMIZERS[job.spec.optimizer].train(optimizer)  # it only steps, never evaluates
    return data, model, optimizer


def alone_worker(rank: int, start: Any, results: Any, job: Job, sizes: list[int], micro: int) -> None:
    """The loop at every size, the optimizer step, the blocks' times: one process alone."""
    data, model, optimizer = settle(job)
    step_s = [step_time(model, optimizer, data, b, job.spec.seed, job.seconds) for b in sizes]
    results.put((step_s, optimizer_time(model, optimizer, data),
                 block_times(model, data, micro, job.spec.seed)))


def contended_worker(rank: int, start: Any, results: Any, job: Job, size: int, steps: int,
                     rounds: int) -> None:
    """One of c processes: all warm up; then, `rounds` times, rank 0 runs `steps` steps alone
    while the others wait, and all run `steps` steps at once, in lock-step."""
    data, model, optimizer = settle(job)
    step_time(model, optimizer, data, size, job.spec.seed + rank, steps=1)

    def sync() -> None:
        start.wait(CONTENDED_TIMEOUT_S)

    for i in range(rounds):
        sync()
        alone = step_time(model, optimizer, data, size, job.spec.seed, steps=steps, warmup=0) \
            if rank == 0 else 0.0
        sync()
        together = step_time(model, optimizer, data, size, job.spec.seed + rank, steps=steps,
                             sync=sync, warmup=0)
        results.put((i, alone, together))


def in_processes(workers: int, target: Callable[..., None], args: tuple, results: int) -> list[Any]:
    """target(rank, barrier, queue, *args) in `workers` fresh processes; the first `results`
    things they put on the queue."""
    ctx = multiprocessing.get_context("spawn")  # fork after torch's thread pools is unsafe
    start, queued = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, start, queued, *args), daemon=True)
             for r in range(workers)]
    for p in procs:
        p.start()
    try:
        return [queued.get(timeout=CONTENDED_TIMEOUT_S) for _ in range(results)]
    except queue.Empty:
        raise RuntimeError(f"plan: {workers} calibration processes did not finish in "
                           f"{CONTENDED_TIMEOUT_S:g} s") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


def contention(job: Job, workers: int, size: int, steps: int, rounds: int = 3) -> float:
    """Step time of `workers` processes computing at once in lock-step, over one alone: the
    median over `rounds` alternations (load drifting on a shared machine hits both alike)."""
    got = in_processes(workers, contended_worker, (job, size, steps, rounds), workers * rounds)
    return statistics.median(max(t for j, _, t in got if j == i) / max(a for j, a, _ in got if j == i)
                             for i in range(rounds))


def optimizer_time(model: nn.Module, optimizer: torch.optim.Optimizer, data: Dataset,
                   repeats: int = 10) -> float:
    backward(model, data.x_train[:8], data.y_train[:8], data.task, 8)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def block_pass(block: nn.Module, i: int, inp: torch.Tensor, y: torch.Tensor, task: str,
               last: bool) -> torch.Tensor:
    """Block i's forward + backward on its own, as a stage runs it (its input detached, needing
    a gradient unless it is the first); its output."""
    inp = inp.detach().requires_grad_(i > 0 and inp.is_floating_point())
    out = block(inp)
    (loss_fn(task)(out, y) if last else out).backward(None if last else torch.ones_like(out))
    return out


def block_times(model: nn.Sequential, data: Dataset, size: int, seed: int, repeats: int = 10
                ) -> list[float]:
    """Forward + backward seconds of each block on a real batch. The least of `repeats`: only
    their ratios are used, and other processes only ever add time."""
    idx = next(real_batches(data, size, seed))
    x, y = data.x_train[idx], data.y_train[idx]
    times: list[list[float]] = [[] for _ in model]
    for rep in range(repeats + 1):  # the first round warms up
        model.zero_grad(set_to_none=True)
        inp = x
        for i, block in enumerate(model):
            t = time.perf_counter()
            inp = block_pass(block, i, inp, y, data.task, i == len(model) - 1)
            if rep:
                times[i].append(time.perf_counter() - t)
    return [min(t) for t in times]


def block_flops(model: nn.Sequential, data: Dataset, size: int = 64) -> list[float]:
    """Forward + backward floating-point operations per sample of each block, as torch's
    FlopCounterMode counts them (matrix products and convolutions)."""
    x, y = data.x_train[:size], data.y_train[:size]
    flops = []
    for i, block in enumerate(model):
        with FlopCounterMode(display=False) as counter:
            x = block_pass(block, i, x, y, data.task, i == len(model) - 1)
        flops.append(counter.get_total_flops() / len(y))
    model.zero_grad(set_to_none=True)
    return flops


@torch.no_grad()
def block_out_bytes(model: nn.Sequential, x: torch.Tensor) -> list[int]:
    out = []
    for block in model:
        x = block(x)
        out.append(x.numel() * x.element_size())
    return out


def calibrate(spec: RunSpec, counts: Sequence[int] = (1, 2), workers_per_node: int | None = None,
              seconds: float = 1.0, niceness: int = 0) -> Costs:
    """Measure Costs for `spec`, in fresh processes at `niceness`: the engine's loop at every
    batch size the plan needs (the shards B / N of `counts`, B / c for c workers on a node, the
    micro-batch B / microbatches), each for `seconds`, and c copies of it at once, c = 2, 4, 8 ..
    up to min(max(counts), workers_per_node) (linear between)."""
    per_node = per_node_count(spec, workers_per_node)
    data, model, _ = setup(spec)
    model = blocks_of(model, spec.model).seq  # the pipeline's blocks: per-block times and bytes
    batch = len(global_batches(spec, data, 1)[0])  # gd: the whole training set
    most = min(max(counts), per_node)
    together = sorted({1, most} | {2**i for i in range(most.bit_length()) if 2**i < most})
    micro = math.ceil(batch / spec.microbatches)
    sizes = sorted({math.ceil(batch / n) for n in [*counts, *together]} | {micro})
    job = Job(spec, seconds, niceness)
    [(step_s, opt, blocks)] = in_processes(1, alone_worker, (job, sizes, micro), 1)
    slow = [1.0]
    for c in together[1:]:
        size = math.ceil(batch / c)
        steps = max(3, math.ceil(seconds / 2 / step_s[sizes.index(size)]))  # about seconds / 2
        slow.append(contention(job, c, size, steps))
    return Costs(sizes, step_s, opt, per_node, together, slow,
                 grad_bytes(model), [t / sum(blocks) for t in blocks], block_sizes(model),
                 block_out_bytes(model, data.x_train[:1]))


def from_flops(spec: RunSpec, rate: float, workers_per_node: int | None = None) -> Costs:
    """Costs given, not measured: every worker computes at `rate` floating-point operations per
    second, whatever else runs on its node (no slowdown), and its optimizer step is free; the
    step's operations are counted (block_flops). For a machine you cannot calibrate on."""
    per_node = per_node_count(spec, workers_per_node)
    data, model, _ = setup(spec)
    model = blocks_of(model, spec.model).seq
    flops = block_flops(model, data)
    return Costs([1], [sum(flops) / rate], 0.0, per_node, [1], [1.0], grad_bytes(model),
                 [f / sum(flops) for f in flops], block_sizes(model),
                 block_out_bytes(model, data.x_train[:1]))
