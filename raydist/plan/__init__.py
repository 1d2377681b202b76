"""`raydist plan`: predict step time and speedup per strategy at worker counts you do not have.

What a prediction is made from (`Costs`, raydist/steptime), each measured apart from the runs it
predicts (calibration.py, in fresh processes at the niceness the workers will have) or given:

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
  transport on one machine (each strategy's cost.TRANSPORT, bench/plan_check.py), or the link
  you give.

Step time for a global batch of B samples on N workers (a pipeline: N stages, M micro-batches):
each strategy's own formula, derived in its docstring, raydist/strategies/<name>/cost.py
(`predicted_step(costs, network, B, N, M)`). The plan predicts every registered strategy that
runs on a cluster (`resources is not None`: local is one process, the N = 1 of all of them).

Bytes per worker: each strategy's cost.worker_bytes (raydist/memory/footprint.py's primitives,
the same function the pre-flight's memory_per_worker refusal uses): model state (parameters,
gradients, optimizer state by the optimizer registry's factor) and the activations kept for the
backward pass, of the worst worker of each row. `--memory-per-worker` marks each row that does
not fit (model state + activations > budget); `--recommend` names the row with the least step
time among those that fit.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from types import ModuleType

from raydist import strategies
from raydist.config import ConfigError
from raydist.config.values import UNITS, parse_bandwidth, parse_duration  # noqa: F401 (plan's API)
from raydist.memory import footprint, gib
from raydist.steptime import Costs, Network, compute, interpolate, ring, slowdown  # noqa: F401 (plan's API)


def planned() -> list[tuple[str, ModuleType]]:
    """(name, module) of every registered strategy that runs on a cluster (local, one process,
    is every strategy's N = 1), grouped by the transport each is predicted on (the transports
    in the order of their names, the strategies of one in the order of registration)."""
    found = [(name, strategies.get(name)) for name in strategies.STRATEGIES]
    return sorted([(name, s) for name, s in found if s.resources is not None],
                  key=lambda named: named[1].cost.TRANSPORT or "")


def parse_rate(text: str) -> float:
    """'2TFLOP/s', '500GFLOPS', '2e12' -> floating-point operations per second."""
    m = re.fullmatch(r"\s*([0-9.]+(?:[eE][0-9]+)?)\s*([kmgtKMGT]?)\s*(?:flop/s|flops)?\s*", text,
                     re.IGNORECASE)
    if not m:
        raise ConfigError(f"flops: got '{text}'; expected a rate like 2TFLOP/s or 2e12")
    return float(m.group(1)) * UNITS[m.group(2).lower()]


def predict(c: Costs, net: Network, batch: int, counts: list[int], microbatches: int = 8,
            memory: tuple[footprint.Sizes, footprint.Layout] | None = None) -> list[dict[str, float]]:
    """One row per (strategy, N): step time, speedup over N = 1, efficiency; with `memory` (the
    model's sizes and the run's layout), the worst worker's predicted bytes."""
    rows = []
    for name, strategy in planned():
        f = strategy.cost.predicted_step
        base = f(c, net, batch, 1, microbatches)
        for n in counts:
            t = f(c, net, batch, n, microbatches)
            row = {"strategy": name, "workers": n, "step_s": t, "speedup": base / t,
                   "efficiency": base / t / n}
            rows.append({**row, **(bytes_of(strategy, n, batch, *memory) if memory else {})})
    return rows


def bytes_of(strategy: ModuleType, n: int, batch: int, sizes: footprint.Sizes,
             layout: footprint.Layout) -> dict[str, float]:
    """The most model state any worker of `strategy` holds, and the most bytes (state +
    activations) with that worker's activations (nan where N cannot run)."""
    workers = strategy.cost.worker_bytes(sizes, dataclasses.replace(layout, n=n, batch=batch))
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
            f"{strategies.get(best['strategy']).COUNT}: "
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
