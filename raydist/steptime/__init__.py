"""The primitives a strategy's step time is predicted from (each strategy's own formula is in
raydist/strategies/<name>/cost.py; `raydist plan` runs them over worker counts).

Why a package of its own, this low: the formulas live with the strategies (a strategy is its
folder), and `plan`, which measures `Costs` (plan/calibration.py) and prints the predictions, is
above the strategies. What the formulas share must be below both. It is pure arithmetic on
numbers already measured, so it imports nothing of raydist: not the engine (it runs nothing),
not memory (bytes are raydist/memory/footprint.py's; this is time).

- `Costs`: what a prediction is made from, measured apart from the runs it predicts
  (plan/calibration.py) or given (a rate in FLOP/s);
- compute(b): one worker's step on b samples, alone on its node (linear between the
  measured batch sizes);
- slowdown(c): how much slower each of c workers computes when c share a node;
- `Network`: a message of x bytes costs latency + x / bandwidth on its transport;
- ring(S, N): one ring all-reduce of S bytes over N workers, 2 (N-1)/N S / bw + 2 (N-1) latency.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Costs:
    """What the predictions are made from (plan/calibration.py measures them)."""

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
    workers_per_node; a fraction: on average). One point: the same for any count."""
    if len(c.concurrency) == 1:
        return c.slowdown[0]
    return interpolate(c.concurrency, c.slowdown, min(workers, c.workers_per_node))


def ring(net: Network, nbytes: float, n: int) -> float:
    """One ring all-reduce of `nbytes` over n workers: each sends and receives 2 (N-1)/N of
    it (a reduce-scatter, then an all-gather), in 2 (N-1) messages."""
    return 2 * (n - 1) / n * nbytes / net.bandwidth + 2 * (n - 1) * net.latency
