"""P5: raydist ps with 2 replicas, one of them a 2x straggler: async (Downpour, bounded
staleness) against sync, same config: steady-state throughput, and where each ends up.

    .venv/bin/python bench/p5_ps_straggler.py --reps 5
"""

from __future__ import annotations

import argparse

import common
import ray

MODES = ("async", "sync")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--straggler", type=float, default=2.0)
    args = p.parse_args()
    specs = {mode: common.spec(strategy="ps", workers=2, servers=1, mode=mode, straggler=args.straggler)
             for mode in MODES}
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}

    def measure(mode: str) -> list[float]:
        records = common.raydist_records(specs[mode])
        runs[mode].append(records[-1])
        return common.steady(records, "samples_per_s")

    common.start_ray()
    rate = common.alternate({mode: (lambda mode=mode: measure(mode)) for mode in MODES}, args.reps)
    ray.shutdown()
    med = {mode: common.median(r) for mode, r in rate.items()}
    rows = [[mode, med[mode], med[mode] / med["sync"],
             common.median([r["val_loss"] for r in runs[mode][1:]]),
             common.median([r["val_accuracy"] for r in runs[mode][1:]])] for mode in MODES]
    base = specs["sync"]
    print(f"\nP5 on {common.machine()}; {base.model} {base.hidden}, batch {base.batch_size}, 2 replicas "
          f"x 1 thread, 1 server, replica 0 {args.straggler:g}x slower; medians of "
          f"{len(rate['sync'])} epochs, final metrics after {base.epochs} epochs")
    print(common.markdown(["mode", "samples/s", "throughput vs sync", "final val_loss",
                           "final val_accuracy"], rows))


if __name__ == "__main__":
    main()
