"""P4: raydist pipeline (2 stages; GPipe by default) with M in {1, 2, 4, 8, 16} micro-batches:
the measured bubble (share of stage time idle, from the stages' own compute timers) against the
schedule's bound (GPipe, 1F1B: (K-1)/(M+K-1); interleaved 1F1B: (K-1)/(V*M+K-1); ZB-H1 with
F = B = W: (K-1)/(3M+K-1)), and the throughput. `--replicas 2` runs DP x PP (2 x 2 actors).

    .venv/bin/python bench/p4_pipeline_bubble.py --reps 5
    .venv/bin/python bench/p4_pipeline_bubble.py --reps 5 --schedule interleaved-1f1b
    .venv/bin/python bench/p4_pipeline_bubble.py --reps 5 --schedule zb-h1
    .venv/bin/python bench/p4_pipeline_bubble.py --reps 5 --replicas 2
"""

from __future__ import annotations

import argparse

import common
import ray

from raydist.strategies.pipeline.schedules import SCHEDULES

MICROBATCHES = (1, 2, 4, 8, 16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--schedule", default="gpipe", choices=list(SCHEDULES))
    p.add_argument("--replicas", type=int, default=1)
    args = p.parse_args()
    # an interleaved schedule runs whole groups of K = 2 micro-batches
    counts = [m for m in MICROBATCHES if not SCHEDULES[args.schedule].interleaved or m % 2 == 0]
    specs = {m: common.spec(strategy="pipeline", stages=2, microbatches=m, schedule=args.schedule,
                            replicas=args.replicas) for m in counts}
    runs: dict[int, list[dict]] = {m: [] for m in counts}

    def measure(m: int) -> list[float]:
        records = common.raydist_records(specs[m])[1:]
        runs[m] += records
        return [r["epoch_time_s"] for r in records]

    common.start_ray()
    common.alternate({m: (lambda m=m: measure(m)) for m in counts}, args.reps)
    ray.shutdown()
    first = specs[counts[0]]
    n = common.samples(first)
    rows = []
    for m in counts:
        kept = runs[m][-args.reps * (specs[m].epochs - 1):]  # the warm-up round's are first
        rows.append([m, common.median([r["bubble_fraction"] for r in kept]), kept[0]["bubble_bound"],
                     n / common.median([r["epoch_time_s"] for r in kept])])
    print(f"\nP4 on {common.machine()}; {first.model} {first.hidden}, batch {first.batch_size}, "
          f"{args.replicas} x 2 stages, {args.schedule}; medians of {args.reps * (first.epochs - 1)} epochs")
    print(common.markdown(["M", "measured bubble", "bound", "samples/s"], rows))


if __name__ == "__main__":
    main()
