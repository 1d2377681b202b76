"""P12: a benchmark where memory decides. A gpt whose model state under Adam (weights, gradients,
m and v: 4 x its parameters) is larger than a per-worker budget: the pre-flight refuses the
strategies that hold all of it per worker (local, ddp) with one line; those that shard it run,
and their throughput, measured memory (memory.csv's worst worker) and predicted memory
(raydist/memory/footprint.py, as `raydist plan` prints it) are set side by side.

    .venv/bin/python bench/p12_memory.py

The candidates are one line each in CANDIDATES; a strategy not registered on this branch
(fsdp, tp before they land) is skipped. Predicted peak = the runtime's resident memory (the peak
RSS of the same strategy on a 2-layer gpt of width 16: Python, torch, Ray, the data) + the
predicted model state and activations.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import common
import ray

import raydist.train
from raydist import strategies
from raydist.config import ConfigError, RunSpec
from raydist.config.values import parse_size
from raydist.engine import setup
from raydist.memory import footprint, gib

MODEL: dict[str, Any] = {"model": "gpt", "data": "text", "text_chars": 12000, "seq_len": 32,
                         "d_model": 256, "layers": 8, "heads": 4, "batch_size": 16,
                         "optimizer": "adam", "lr": 1e-3, "epochs": 2, "threads_per_worker": 1}
"""6.4 M parameters (24.3 MiB): 97 MiB of model state under Adam."""
BUDGET = "64MiB"
TINY = {"d_model": 16, "layers": 2, "heads": 2}
CANDIDATES: list[tuple[str, dict[str, Any]]] = [
    ("local", {}),
    ("ddp", {"workers": 2}),
    ("fsdp", {"workers": 2}),
    ("tp", {"workers": 2}),
    ("pipeline", {"stages": 2, "microbatches": 4}),
    ("pipeline", {"stages": 4, "microbatches": 4}),
]


def train(spec: RunSpec) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="raydist_bench_") as out:
        raydist.train.train(spec.replace(out=out), report=records.append, track=False)
    return records


def predicted(spec: RunSpec) -> footprint.Worker:
    data, model, _ = setup(spec)
    sizes = footprint.sizes_of(model, spec.model, spec.optimizer, data.x_train[:1])
    strategy = strategies.get(spec.strategy)
    workers = strategy.cost.worker_bytes(sizes, footprint.Layout.of(spec, strategy.COUNT))
    return max(workers, key=lambda w: w.total)


def row(strategy: str, knobs: dict[str, Any], budget: str) -> list[Any]:
    spec = RunSpec.from_dict({**MODEL, "strategy": strategy, "memory_per_worker": budget, **knobs})
    n = knobs.get("stages", knobs.get("workers", 1))
    want = predicted(spec)
    try:
        records = train(spec)
    except ConfigError as e:
        return [strategy, n, f"refused: `error: {e}`", "-", "-", gib(want.state), "-", "-"]
    runtime = train(spec.replace(**TINY, memory_per_worker=None))[-1]["peak_rss_bytes"]
    last = records[-1]
    return [strategy, n, "ran", f"{common.median(common.steady(records, 'samples_per_s')):.1f}",
            gib(last["model_state_bytes"]), gib(want.state), gib(last["peak_rss_bytes"]),
            f"{gib(runtime + want.total)} ({last['peak_rss_bytes'] / (runtime + want.total):.2f})"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", default=BUDGET, help="memory_per_worker of every candidate")
    args = p.parse_args()
    common.start_ray()
    rows = []
    for name, knobs in CANDIDATES:
        if name in strategies.STRATEGIES:  # fsdp, tp: once they land
            rows.append(row(name, knobs, args.budget))
            print(f"P12 row: {rows[-1]}", flush=True)
    ray.shutdown()
    print(f"\nP12 on {common.machine()}; gpt d_model {MODEL['d_model']} x {MODEL['layers']} layers, "
          f"Adam, batch {MODEL['batch_size']} x {MODEL['seq_len']} tokens, budget {args.budget} "
          f"({gib(parse_size(args.budget))}) per worker; samples/s: median of epochs 2..{MODEL['epochs']}")
    print(common.markdown(["strategy", "N", "pre-flight", "samples/s", "model state (measured)",
                           "model state (predicted)", "peak RSS (measured)",
                           "peak RSS (predicted; measured/predicted)"], rows))


if __name__ == "__main__":
    main()
