"""`raydist plan`: predict step time and speedup per strategy at worker counts you do not have.

What a prediction is made from (`Costs`), each measured apart from the runs it predicts
(`calibrate`, in fresh processes at the niceness the workers will have) or given:

- compute(b): seconds per step of the engine's own epoch loop (the gather of a shuffled real
  batch of b samples, forward, backward, optimizer step, per-step bookkeeping) on one worker
  alone on its node; measured at the batch sizes the plan needs, linear between them.
- s(c): how much slower each of c workers computes when c run at once on one node: c copies of
  that loop in c processes, in lock-step (they wait for each other every step, as synchronous
  workers do), against one alone, c = 1, 2, 4 .. w; linear between, s(c > w) = s(w).
  w = workers per node (default: CPUs // threads per worker).
- opt: the optimizer step alone (part of compute(b)).
- per model block: share_j of forward + backward time, its parameters (the pipeline cuts where
  the strategy does by default: balanced by parameters), a_j its output bytes per sample.
- S: bytes of all gradients (= of all weights).
- a message of x bytes costs t(x) = latency + x / bw on its transport (`Network`): measured per
  transport on one machine (`TRANSPORTS`), or the link you give.

Step time for a global batch of B samples, b = ceil(B / N) samples per worker:

- ddp       compute(b) s(N) + 2 (N-1)/N S / bw + 2 (N-1) latency            (ring all-reduce)
- ps sync   (compute(b) - opt) s(N) + opt / P + 2 latency + (N + nodes) S / (P bw)
            the replicas compute gradients only, the P servers sum them and step; the servers'
            link carries N gradients in and one copy of the weights out per node (replicas on
            one node share it in the object store), nodes = ceil(N / w)
- pipeline  K stages, M micro-batches of m = ceil(B / M); stage k (h_k: the sum of its blocks'
            share_j) computes a micro-batch's forward + backward in t_k = h_k (compute(m) - opt) s(c),
            c = sum_k h_k / max_k h_k (stages busy, on average, while the slowest one is); each
            cut passes m a_cut bytes per micro-batch each way. GPipe and 1F1B:
                sum_k t_k + (M - 1) max_k (t_k + sum over k's cuts of t(m a_cut))
                + sum over cuts of 2 t(m a_cut) + opt (largest stage's share of parameters)
            the first micro-batch fills the pipe and the last drains it (one message each way
            over every cut); in between the slowest stage sets the pace, and each message it
            receives costs t(): gloo moves a message only once its receiver asks, however early
            the sender posted it (so the p2p transport is measured between busy processes, see
            bench/plan_check.py); every stage steps at the flush. Nan for K > blocks.
"""

from __future__ import annotations

import bisect
import itertools
import math
import multiprocessing
import os
import queue
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raydist.config import ConfigError, RunSpec
from raydist.data import Dataset, batch_order
from raydist.engine import LOSSES, backward, global_batches, setup, train_epoch
from raydist.pipelining import balanced_cuts, block_sizes

UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
TRANSPORTS = {"ddp": "allreduce", "ps": "object_store", "pipeline": "p2p"}
"""The transport each strategy's messages take: gloo all-reduce, actor to actor through the
object store, gloo point to point (bench/plan_check.py measures each on one machine)."""
CONTENDED_TIMEOUT_S = 600.0
"""Bound on the concurrent calibration processes: a stuck one surfaces as an error."""


def parse_bandwidth(text: str) -> float:
    """'25Gbit/s', '10GB/s', '100Mbit/s' -> bytes per second."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgtKMGT]?)(bit|b|B|byte)(/s|ps)?\s*", text)
    if not m:
        raise ConfigError(f"bandwidth: got '{text}'; expected a rate like 25Gbit/s or 3GB/s")
    value = float(m.group(1)) * UNITS[m.group(2).lower()]
    return value / 8 if m.group(3) in ("bit", "b") else value


def parse_duration(text: str) -> float:
    """'10us', '2ms', '0.5s' -> seconds."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ns|us|ms|s)\s*", text)
    if not m:
        raise ConfigError(f"latency: got '{text}'; expected a time like 10us or 2ms")
    return float(m.group(1)) * {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]


@dataclass
class Costs:
    """What the predictions are made from (see the module docstring)."""

    batches: list[int]
    """batch sizes per worker at which step_s was measured, ascending"""
    step_s: list[float]
    """compute(b): seconds per step of the engine's epoch loop at each of those sizes"""
    optimizer_s: float
    """the optimizer step alone (part of every step_s)"""
    workers_per_node: int
    """workers (ps replicas, pipeline stages) that share one node"""
    concurrency: list[int]
    """workers computing at once on one node at which slowdown was measured, ascending from 1"""
    slowdown: list[float]
    """step time of each of that many workers computing at once, over one alone"""
    grad_bytes: int
    """bytes of all gradients (= of all weights)"""
    block_share: list[float]
    """each model block's share of forward + backward time"""
    block_params: list[int]
    """parameters of each block: the pipeline cuts balance them"""
    block_out_bytes: list[int]
    """bytes per sample each block outputs: what crosses a cut after it"""


@dataclass
class Network:
    bandwidth: float
    """bytes per second"""
    latency: float
    """seconds per message"""

    def time(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Linear between the measured points, along the end segments beyond them (never below 0);
    proportional to x when there is a single point."""
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    (x0, x1), (y0, y1) = xs[i - 1 : i + 1], ys[i - 1 : i + 1]
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), 0.0)


def compute(c: Costs, samples: float) -> float:
    """One worker's step on `samples` samples, alone on its node."""
    return interpolate(c.batches, c.step_s, samples)


def slowdown(c: Costs, workers: float) -> float:
    """Slowdown of each of `workers` workers computing at once (spread over nodes of
    workers_per_node; a fraction: on average)."""
    return interpolate(c.concurrency, c.slowdown, min(workers, c.workers_per_node))


def ddp_step(c: Costs, net: Network, batch: int, n: int) -> float:
    ring = 2 * (n - 1) / n * c.grad_bytes / net.bandwidth + 2 * (n - 1) * net.latency
    return compute(c, math.ceil(batch / n)) * slowdown(c, n) + ring


def ps_step(c: Costs, net: Network, batch: int, n: int, servers: int = 1) -> float:
    replica = (compute(c, math.ceil(batch / n)) - c.optimizer_s) * slowdown(c, n)
    nodes = math.ceil(n / c.workers_per_node)
    link = 2 * net.latency + (n + nodes) * c.grad_bytes / (servers * net.bandwidth)
    return replica + c.optimizer_s / servers + link


def stage_bounds(c: Costs, k: int) -> list[int]:
    """[0, cut_1, ..., blocks]: the strategy's default cut (balanced by parameters)."""
    return [0, *balanced_cuts(c.block_params, k), len(c.block_params)]


def pipeline_step(c: Costs, net: Network, batch: int, k: int, m: int) -> float:
    if k > len(c.block_params):
        return math.nan
    micro = math.ceil(batch / m)
    bounds = stage_bounds(c, k)
    shares = [sum(c.block_share[a:b]) for a, b in itertools.pairwise(bounds)]
    busy = sum(shares) / max(shares)  # stages computing, on average, while the slowest one does
    t = [(compute(c, micro) - c.optimizer_s) * slowdown(c, busy) * share for share in shares]
    cuts = {cut: micro * c.block_out_bytes[cut - 1] for cut in bounds[1:-1]}  # bytes per message
    # gloo moves a message only once its receiver asks for it: receiving what a neighbour sent
    # long ago still costs a message's time (the sender, computing, answers when it gets a core)
    cycle = [t[i] + sum(net.time(n) for cut, n in cuts.items() if cut in bounds[i : i + 2])
             for i in range(k)]
    fill = sum(2 * net.time(n) for n in cuts.values())
    params = max(sum(c.block_params[a:b]) for a, b in itertools.pairwise(bounds))
    flush = c.optimizer_s * params / sum(c.block_params)
    return sum(t) + (min(m, batch) - 1) * max(cycle) + fill + flush


STEPS: dict[str, Callable[[Costs, Network, int, int, int], float]] = {
    "ddp": lambda c, net, batch, n, m: ddp_step(c, net, batch, n),
    "ps": lambda c, net, batch, n, m: ps_step(c, net, batch, n),
    "pipeline": lambda c, net, batch, n, m: pipeline_step(c, net, batch, n, m),
}
"""Step time of (costs, network, global batch, N workers or stages, micro-batches) per strategy."""


def predict(c: Costs, net: Network, batch: int, counts: list[int], microbatches: int = 8
            ) -> list[dict[str, float]]:
    """One row per (strategy, N): step time, speedup over N = 1, efficiency."""
    rows = []
    for strategy, f in STEPS.items():
        base = f(c, net, batch, 1, microbatches)
        for n in counts:
            t = f(c, net, batch, n, microbatches)
            rows.append({"strategy": strategy, "workers": n, "step_s": t, "speedup": base / t,
                         "efficiency": base / t / n})
    return rows


# --- calibration: the engine's own loop, alone and c at once -------------------------------------

def default_workers_per_node(spec: RunSpec) -> int:
    return max(1, (os.cpu_count() or 1) // spec.threads_per_worker)


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
    return setup(job.spec)


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


def block_times(model: nn.Sequential, data: Dataset, size: int, seed: int, repeats: int = 10
                ) -> list[float]:
    """Forward + backward seconds of each block on a real batch, each block on its own as a
    stage runs it (its input detached, needing a gradient unless it is the first). The least of
    `repeats`: only their ratios are used, and other processes only ever add time."""
    idx = next(real_batches(data, size, seed))
    x, y = data.x_train[idx], data.y_train[idx]
    times: list[list[float]] = [[] for _ in model]
    for rep in range(repeats + 1):  # the first round warms up
        model.zero_grad(set_to_none=True)
        inp = x
        for i, block in enumerate(model):
            inp = inp.detach().requires_grad_(i > 0 and inp.is_floating_point())
            t = time.perf_counter()
            out = block(inp)
            last = i == len(model) - 1
            (LOSSES[data.task](out, y) if last else out).backward(None if last else torch.ones_like(out))
            if rep:
                times[i].append(time.perf_counter() - t)
            inp = out
    return [min(t) for t in times]


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
    if workers_per_node is not None and workers_per_node < 1:
        raise ConfigError(f"workers_per_node: got {workers_per_node}; expected an integer >= 1")
    per_node = workers_per_node or default_workers_per_node(spec)
    data, model, _ = setup(spec)
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
                 sum(p.numel() * p.element_size() for p in model.parameters()),
                 [t / sum(blocks) for t in blocks], block_sizes(model),
                 block_out_bytes(model, data.x_train[:1]))


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(f"workers: got '{text}'; expected worker counts like 1,2,4,8")
    return sorted(set(counts))


def table(rows: list[dict[str, float]]) -> str:
    lines = [f"{'strategy':<9} {'N':>5} {'step ms':>9} {'speedup':>8} {'efficiency':>10}"]
    lines += [f"{r['strategy']:<9} {r['workers']:>5} {r['step_s'] * 1e3:>9.2f} {r['speedup']:>8.2f} "
              f"{r['efficiency']:>10.2f}" for r in rows]
    return "\n".join(lines)


def write(rows: list[dict[str, float]], out: Path) -> None:
    """plan.csv and plan.png (predicted speedup per strategy, with the ideal line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "plan.csv", index=False)
    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, part in df.groupby("strategy"):
        ax.plot(part["workers"], part["speedup"], marker="o", label=strategy)
    ax.plot(df["workers"], df["workers"], "k--", label="ideal")
    ax.set(xscale="log", yscale="log", xlabel="workers / stages", ylabel="predicted speedup")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "plan.png")
    plt.close(fig)
