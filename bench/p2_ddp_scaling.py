"""Median epoch time of local (2 threads), local (1 thread), ddp 1 worker and ddp 2 workers
(1 thread each) on one config, measured side by side.

    .venv/bin/python bench/ddp_epoch_time.py --reps 5

Each repetition runs every variant once, in turn, so machine load drifts over all of them
alike; a warm-up round comes first and is not counted. Within a run the first epoch is left
out too (first-touch allocations, thread-pool start-up). Epoch time is what the engine
measures: the training pass and its all-reduce, not Ray Train's start-up.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile

import ray

from raydist import strategies
from raydist.config import RunSpec
from raydist.data import load_data
from raydist.engine import Record

VARIANTS = {  # name: (strategy, workers, threads per worker)
    "local, 2 threads": ("local", 1, 2),
    "local, 1 thread": ("local", 1, 1),
    "ddp, 1 worker": ("ddp", 1, 1),
    "ddp, 2 workers": ("ddp", 2, 1),
}


def epoch_times(spec: RunSpec) -> list[float]:
    """One fresh run (a new out folder, so ddp never resumes); steady-state epoch times."""
    records: list[Record] = []
    with tempfile.TemporaryDirectory(prefix="ddp_bench_") as out:
        strategies.get(spec.strategy).run(spec.replace(out=out), records.append)
    return [r["epoch_time_s"] for r in records[1:]]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="counted repetitions (after one warm-up)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is not counted")
    p.add_argument("--data", default="digits")
    p.add_argument("--model", default="mlp")
    p.add_argument("--hidden", default="256,256")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", default="adam")
    args = p.parse_args(argv)

    base = RunSpec.from_dict({"data": args.data, "model": args.model, "hidden": args.hidden,
                              "batch_size": args.batch_size, "optimizer": args.optimizer,
                              "epochs": max(2, args.epochs)})
    specs = {name: base.replace(strategy=s, workers=w, threads_per_worker=t)
             for name, (s, w, t) in VARIANTS.items()}
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False,
             logging_level=logging.WARNING)
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {name: [] for name in specs}
    for rep in range(args.reps + 1):  # rep 0 is the warm-up
        for name, spec in specs.items():
            t = epoch_times(spec)
            if rep:
                times[name] += t
        print(f"{'warm-up' if rep == 0 else f'rep {rep}/{args.reps}'} done", flush=True)
    ray.shutdown()
    print_table(base, times, load_before, os.getloadavg()[0])


def print_table(base: RunSpec, times: dict[str, list[float]], load_before: float,
                load_after: float) -> None:
    n_train = load_data(base).n_train
    ref = statistics.median(times["local, 1 thread"])
    print(f"\n{base.model} {base.hidden} on {base.data} ({n_train} samples/epoch), batch "
          f"{base.batch_size}, {base.optimizer}; {os.cpu_count()} CPUs, load average "
          f"{load_before:.1f} -> {load_after:.1f}; medians of {len(times[next(iter(times))])} epochs")
    print(f"| {'variant':<17} | median epoch s | samples/s | vs local 1 thread |")
    print(f"|{'-' * 19}|----------------|-----------|-------------------|")
    for name, t in times.items():
        m = statistics.median(t)
        print(f"| {name:<17} | {m:14.4f} | {n_train / m:9.0f} | {ref / m:16.2f}x |")


if __name__ == "__main__":
    main()
