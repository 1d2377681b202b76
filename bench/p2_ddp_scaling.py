"""P2: scaling efficiency of raydist ddp with 1 and 2 workers x 1 thread, against local with
1 thread, on the compute-bound config.

    .venv/bin/python bench/p2_ddp_scaling.py --reps 5

Epoch time is what the engine measures: the training pass and its all-reduces, not Ray
Train's start-up. efficiency(N) = throughput(N) / (N * throughput(reference)).
"""

from __future__ import annotations

import argparse

import common
import ray

VARIANTS = {"local, 1 thread": ("local", 1), "ddp, 1 worker": ("ddp", 1), "ddp, 2 workers": ("ddp", 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    specs = {name: common.spec(strategy=s, workers=w) for name, (s, w) in VARIANTS.items()}
    common.start_ray()
    times = common.alternate({name: (lambda s=s: common.steady(common.raydist_records(s)))
                              for name, s in specs.items()}, args.reps)
    ray.shutdown()
    med = {name: common.median(t) for name, t in times.items()}
    local, one = med["local, 1 thread"], med["ddp, 1 worker"]
    rows = [[name, m, VARIANTS[name][1], one / m / VARIANTS[name][1], local / m / VARIANTS[name][1]]
            for name, m in med.items()]
    base = specs["ddp, 2 workers"]
    print(f"\nP2 on {common.machine()}; {base.model} {base.hidden} on {base.data}, batch "
          f"{base.batch_size}; medians of {len(times['ddp, 1 worker'])} epochs")
    print(common.markdown(["variant", "median epoch s", "workers", "efficiency vs ddp 1",
                           "efficiency vs local 1 thread"], rows))


if __name__ == "__main__":
    main()
