"""P4: raydist pipeline (2 stages, GPipe) with M in {1, 2, 4, 8, 16} micro-batches: the measured
bubble (share of stage time idle, from the stages' own compute timers) against the bound
(K - 1) / (M + K - 1), and the throughput.

    .venv/bin/python bench/p4_pipeline_bubble.py --reps 5
"""

from __future__ import annotations

import argparse

import common
import ray

MICROBATCHES = (1, 2, 4, 8, 16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    specs = {m: common.spec(strategy="pipeline", stages=2, microbatches=m) for m in MICROBATCHES}
    runs: dict[int, list[dict]] = {m: [] for m in MICROBATCHES}

    def measure(m: int) -> list[float]:
        records = common.raydist_records(specs[m])[1:]
        runs[m] += records
        return [r["epoch_time_s"] for r in records]

    common.start_ray()
    common.alternate({m: (lambda m=m: measure(m)) for m in MICROBATCHES}, args.reps)
    ray.shutdown()
    n = common.samples(specs[1])
    rows = []
    for m in MICROBATCHES:
        kept = runs[m][-args.reps * (specs[m].epochs - 1):]  # the warm-up round's are first
        rows.append([m, common.median([r["bubble_fraction"] for r in kept]), kept[0]["bubble_bound"],
                     n / common.median([r["epoch_time_s"] for r in kept])])
    print(f"\nP4 on {common.machine()}; {specs[1].model} {specs[1].hidden}, batch {specs[1].batch_size}, "
          f"2 stages, GPipe; medians of {args.reps * (specs[1].epochs - 1)} epochs")
    print(common.markdown(["M", "measured bubble", "bound (K-1)/(M+K-1)", "samples/s"], rows))


if __name__ == "__main__":
    main()
