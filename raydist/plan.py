"""`raydist plan`: predict step time and speedup per strategy at worker counts you do not have.

The model is the usual alpha-beta one. A step on one worker costs `fixed + per_sample * b` for a
batch of b samples (measured by a short calibration run, or given). Communication of S bytes costs
S / bandwidth plus `latency` per message:

- ddp       compute(B/N) + ring all-reduce 2(N-1)/N * S/bw + 2(N-1) * latency
- ps sync   compute(B/N) + the server link carrying N gradients up and N weight copies down,
            2 N S / (servers * bw) + 2 * latency
- pipeline  (M + K - 1) slots of one micro-batch on one stage, compute(B/M)/K, plus one hop of the
            activations at the cut per slot (the GPipe bubble is the M + K - 1)
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from raydist.config import ConfigError, RunSpec
from raydist.engine import setup, step

UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


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
    """What the predictions are made from."""

    fixed_s: float
    """per-step cost independent of the batch (optimizer step, Python)"""
    per_sample_s: float
    """forward + backward time per sample on one worker"""
    grad_bytes: int
    """bytes of all gradients (= of all weights)"""
    activation_bytes: float
    """bytes per sample crossing the middle cut of the model (pipeline)"""


@dataclass
class Network:
    bandwidth: float
    """bytes per second"""
    latency: float
    """seconds per message"""


def compute(c: Costs, samples: float) -> float:
    return c.fixed_s + c.per_sample_s * samples


def ddp_step(c: Costs, net: Network, batch: int, n: int) -> float:
    ring = 2 * (n - 1) / n * c.grad_bytes / net.bandwidth + 2 * (n - 1) * net.latency
    return compute(c, batch / n) + ring


def ps_step(c: Costs, net: Network, batch: int, n: int, servers: int = 1) -> float:
    link = 2 * n * c.grad_bytes / (servers * net.bandwidth) + 2 * net.latency
    return compute(c, batch / n) + link


def pipeline_step(c: Costs, net: Network, batch: int, k: int, m: int) -> float:
    if k == 1:
        return compute(c, batch)
    slot = c.per_sample_s * batch / (m * k)
    hop = 2 * (c.activation_bytes * batch / m / net.bandwidth + net.latency)  # forward and backward
    return c.fixed_s + (m + k - 1) * (slot + hop)


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


def calibrate(spec: RunSpec, repeats: int = 5) -> Costs:
    """Time local steps at half and full batch: the slope is the per-sample cost."""
    torch.set_num_threads(spec.threads_per_worker)
    data, model, opt = setup(spec)

    def timed(b: int) -> float:
        x, y = data.x_train[:b], data.y_train[:b]
        step(model, opt, x, y, data.task, b)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            step(model, opt, x, y, data.task, b)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    full = min(spec.batch_size, data.n_train)
    half = max(1, full // 2)
    t_half, t_full = timed(half), timed(full)
    per_sample = max(t_full - t_half, 0.0) / max(full - half, 1)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        mid = model[: max(1, len(model) // 2)](data.x_train[:1])
    return Costs(max(t_full - per_sample * full, 0.0), per_sample, grad_bytes,
                 mid.numel() * mid.element_size())


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
