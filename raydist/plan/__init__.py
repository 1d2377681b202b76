"""`raydist plan`: predict step time and speedup per strategy at worker counts you do not have.

What a prediction is made from (`Costs`), each measured apart from the runs it predicts
(calibration.py, in fresh processes at the niceness the workers will have) or given:

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
- fsdp      compute(b) s(N) + 3 (N-1)/N S / bw + 3 (N-1) latency x blocks
            every block's parameters all-gathered for the forward and again for the backward,
            its gradients reduce-scattered: 3 (N-1)/N S on the wire per worker, per step
- tp        compute(B) s(N) (h / N + 1 - h) + 4 ring all-reduces of B a_j per block j between
            the first and the last (Megatron-LM: two in the forward, two in the backward of a
            transformer block's attention and MLP pairs), each 2 (N-1)/N B a_j / bw
            + 2 (N-1) latency. h = the sum of those blocks' share_j: assumed split evenly over
            the N ranks, the first and last block (embedding, head) computed whole by each;
            every rank sees the whole batch
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
            the sender posted it, and the sender is then mid-compute (so the p2p transport is
            measured in a pipeline's flow, see bench/plan_check.py); every stage steps at the
            flush. Nan for K > blocks.

Bytes per worker (raydist/memory/footprint.py, the same function the pre-flight's memory_per_worker
refusal uses): model state (parameters, gradients, optimizer state by the optimizer registry's
factor) and the activations kept for the backward pass, of the worst worker of each row.
`--memory-per-worker` marks each row that does not fit (model state + activations > budget);
`--recommend` names the row with the least step time among those that fit.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from raydist.config import ConfigError
from raydist.config.values import UNITS, parse_bandwidth, parse_duration  # noqa: F401 (plan's API)
from raydist.memory import footprint, gib
from raydist.plan.calibration import Costs
from raydist.strategies.pipeline.cuts import balanced_cuts

TRANSPORTS = {"ddp": "allreduce", "ps": "object_store", "pipeline": "p2p"}
"""The transport each strategy's messages take: gloo all-reduce, actor to actor through the
object store, gloo point to point (bench/plan_check.py measures each on one machine)."""


def parse_rate(text: str) -> float:
    """'2TFLOP/s', '500GFLOPS', '2e12' -> floating-point operations per second."""
    m = re.fullmatch(r"\s*([0-9.]+(?:[eE][0-9]+)?)\s*([kmgtKMGT]?)\s*(?:flop/s|flops)?\s*", text,
                     re.IGNORECASE)
    if not m:
        raise ConfigError(f"flops: got '{text}'; expected a rate like 2TFLOP/s or 2e12")
    return float(m.group(1)) * UNITS[m.group(2).lower()]


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
    workers_per_node; a fraction: on average). One point: the same for any count."""
    if len(c.concurrency) == 1:
        return c.slowdown[0]
    return interpolate(c.concurrency, c.slowdown, min(workers, c.workers_per_node))


def ddp_step(c: Costs, net: Network, batch: int, n: int) -> float:
    ring = 2 * (n - 1) / n * c.grad_bytes / net.bandwidth + 2 * (n - 1) * net.latency
    return compute(c, math.ceil(batch / n)) * slowdown(c, n) + ring


def fsdp_step(c: Costs, net: Network, batch: int, n: int) -> float:
    gather = 3 * (n - 1) / n * c.grad_bytes / net.bandwidth + 3 * (n - 1) * net.latency * len(c.block_params)
    return compute(c, math.ceil(batch / n)) * slowdown(c, n) + gather


def ring(net: Network, nbytes: float, n: int) -> float:
    """One ring all-reduce of `nbytes` over n workers."""
    return 2 * (n - 1) / n * nbytes / net.bandwidth + 2 * (n - 1) * net.latency


def tp_step(c: Costs, net: Network, batch: int, n: int) -> float:
    """The blocks between the first and the last are split N ways, the first and last (the
    embedding, the head) computed whole on every rank."""
    split = sum(c.block_share[1:-1])
    work = compute(c, batch) * slowdown(c, n) * (split / n + 1 - split)
    return work + sum(4 * ring(net, batch * a, n) for a in c.block_out_bytes[1:-1])


def ps_step(c: Costs, net: Network, batch: int, n: int, servers: int = 1) -> float:
    replica = (compute(c, math.ceil(batch / n)) - c.optimizer_s) * slowdown(c, n)
    nodes = math.ceil(n / c.workers_per_node)
    link = 2 * net.latency + (n + nodes) * c.grad_bytes / (servers * net.bandwidth)
    return replica + c.optimizer_s / servers + link


def stage_bounds(c: Costs, k: int) -> list[int]:
    """[0, cut_1, ..., blocks]: the strategy's default cut (balanced by parameters)."""
    return [0, *balanced_cuts(c.block_params, k), len(c.block_params)]


def stage_times(c: Costs, batch: int, k: int, m: int) -> list[float]:
    """t_k: each of k stages' forward + backward of one micro-batch, while they compute at once."""
    bounds = stage_bounds(c, k)
    shares = [sum(c.block_share[a:b]) for a, b in itertools.pairwise(bounds)]
    busy = sum(shares) / max(shares)  # stages computing, on average, while the slowest one does
    return [(compute(c, math.ceil(batch / m)) - c.optimizer_s) * slowdown(c, busy) * share
            for share in shares]


def pipeline_step(c: Costs, net: Network, batch: int, k: int, m: int) -> float:
    if k > len(c.block_params):
        return math.nan
    micro = math.ceil(batch / m)
    bounds = stage_bounds(c, k)
    t = stage_times(c, batch, k, m)
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
    "fsdp": lambda c, net, batch, n, m: fsdp_step(c, net, batch, n),
    "tp": lambda c, net, batch, n, m: tp_step(c, net, batch, n),
    "ps": lambda c, net, batch, n, m: ps_step(c, net, batch, n),
    "pipeline": lambda c, net, batch, n, m: pipeline_step(c, net, batch, n, m),
}
"""Step time of (costs, network, global batch, N workers or stages, micro-batches) per strategy."""


def predict(c: Costs, net: Network, batch: int, counts: list[int], microbatches: int = 8,
            memory: tuple[footprint.Sizes, footprint.Layout] | None = None) -> list[dict[str, float]]:
    """One row per (strategy, N): step time, speedup over N = 1, efficiency; with `memory` (the
    model's sizes and the run's layout), the worst worker's predicted bytes."""
    rows = []
    for strategy, f in STEPS.items():
        base = f(c, net, batch, 1, microbatches)
        for n in counts:
            t = f(c, net, batch, n, microbatches)
            row = {"strategy": strategy, "workers": n, "step_s": t, "speedup": base / t,
                   "efficiency": base / t / n}
            rows.append({**row, **(bytes_of(strategy, n, batch, *memory) if memory else {})})
    return rows


def bytes_of(strategy: str, n: int, batch: int, sizes: footprint.Sizes,
             layout: footprint.Layout) -> dict[str, float]:
    """The most model state any worker holds, and the most bytes (state + activations) with
    that worker's activations (nan where N cannot run)."""
    workers = footprint.FOOTPRINTS[strategy](sizes, dataclasses.replace(layout, n=n, batch=batch))
    if not workers:
        return {"state_bytes": math.nan, "activation_bytes": math.nan, "bytes_per_worker": math.nan}
    most = max(workers, key=lambda w: w.total)
    return {"state_bytes": max(w.state for w in workers), "activation_bytes": most.activations,
            "bytes_per_worker": most.total}


def mark(rows: list[dict[str, float]], budget: float) -> list[dict[str, float]]:
    """Each row with `fits`: its worst worker's bytes within `budget`."""
    return [{**r, "fits": bool(r["bytes_per_worker"] <= budget)} for r in rows]


def recommend(rows: list[dict[str, float]]) -> dict[str, float] | None:
    """The row with the least step time among those that fit (None: none does)."""
    fitting = [r for r in rows if r.get("fits", True) and math.isfinite(r["step_s"])]
    return min(fitting, key=lambda r: (r["step_s"], r["workers"]), default=None)


def recommendation(best: dict[str, float] | None, budget: float | None) -> str:
    within = f" (budget {gib(budget)})" if budget is not None else ""
    if best is None:
        return f"recommend: nothing fits{within}; more workers or stages, or a smaller model"
    return (f"recommend: {best['strategy']} on {best['workers']} "
            f"{'stages' if best['strategy'] == 'pipeline' else 'workers'}: "
            f"{best['step_s'] * 1e3:.2f} ms per step, {gib(best['bytes_per_worker'])} per worker{within}")


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(f"workers: got '{text}'; expected worker counts like 1,2,4,8")
    return sorted(set(counts))


def table(rows: list[dict[str, float]]) -> str:
    """The rows as text; with bytes, a column of them (and whether each fits the budget)."""
    mem = "bytes_per_worker" in (rows[0] if rows else {})
    fits = "fits" in (rows[0] if rows else {})
    lines = [f"{'strategy':<9} {'N':>5} {'step ms':>9} {'speedup':>8} {'efficiency':>10}"
             + (f" {'per worker':>11}" if mem else "") + (f" {'fits':>4}" if fits else "")]
    for r in rows:
        line = (f"{r['strategy']:<9} {r['workers']:>5} {r['step_s'] * 1e3:>9.2f} {r['speedup']:>8.2f} "
                f"{r['efficiency']:>10.2f}")
        if mem:
            line += f" {gib(r['bytes_per_worker']) if math.isfinite(r['bytes_per_worker']) else '-':>11}"
        if fits:
            line += f" {'yes' if r['fits'] else 'no':>4}"
        lines.append(line)
    return "\n".join(lines)


def write(rows: list[dict[str, float]], out: Path) -> None:
    """plan.csv and plan.png (predicted speedup per strategy, with the ideal line)."""
    import pandas as pd

    from raydist import figures

    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "plan.csv", index=False)
    fig, ax = figures.subplots(figsize=(6, 4))
    for strategy, part in df.groupby("strategy"):
        ax.plot(part["workers"], part["speedup"], marker="o", label=strategy)
    ax.plot(df["workers"], df["workers"], "k--", label="ideal")
    ax.set(xscale="log", yscale="log", xlabel="workers / stages", ylabel="predicted speedup")
    ax.legend()
    figures.save(fig, out / "plan.png")
