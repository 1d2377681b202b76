"""P2: raydist ddp against this machine's bound, side by side in one run: N bare Ray actors
(raydist/plan/machine_bound.py: each trains the same model, optimizer and threads on its 1/N of every batch,
nothing exchanged) beside local, ddp on 1 and 2 workers, and ddp with local SGD (k = 16) on 2.

    .venv/bin/python bench/p2_ddp_scaling.py --reps 5

The workload is issue 19's: mlp 1024,1024,512 on digits, batch 256, adam, 1 thread per worker.
Samples/s is what the engine measures per epoch (the training pass and its all-reduces, not Ray
Train's start-up); the bound's is the slowest actor's. efficiency vs ideal = samples/s(N) /
(N x ddp 1 worker); vs bound = samples/s(N) / bound(N): P2a = ddp local SGD on 2 / bound 2,
P2c = ddp 1 / bound 1.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import common
import ray

from raydist.config import RunSpec
from raydist.plan import machine_bound as bound

P2 = {"data": "digits", "hidden": "1024,1024,512", "batch_size": 256, "optimizer": "adam",
      "lr": 0.001, "epochs": 6}
VARIANTS = {"local, 1 thread": ("local", 1, 1), "ddp, 1 worker": ("ddp", 1, 1),
            "ddp, 2 workers": ("ddp", 2, 1), "ddp, 2 workers, local SGD k=16": ("ddp", 2, 16)}
BOUNDS = {"bound, 1 bare actor": 1, "bound, 2 bare actors": 2}


def raydist_side(spec: RunSpec) -> Callable[[], list[float]]:
    return lambda: common.steady(common.raydist_records(spec), "samples_per_s")


def bound_side(spec: RunSpec, n: int) -> Callable[[], list[float]]:
    def run() -> list[float]:
        actors = bound.start(n)
        try:
            samples, times = bound.epoch_times(spec, actors, spec.epochs)
        finally:
            bound.stop(actors)
        return [samples / t for t in times[1:]]
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    base = common.spec(**P2)
    sides = {name: raydist_side(base.replace(strategy=s, workers=w, local_sgd_steps=k))
             for name, (s, w, k) in VARIANTS.items()}
    sides |= {name: bound_side(base, n) for name, n in BOUNDS.items()}
    common.start_ray()
    rates = common.alternate(sides, args.reps)
    ray.shutdown()
    med = {name: common.median(r) for name, r in rates.items()}
    workers = {**{k: v[1] for k, v in VARIANTS.items()}, **BOUNDS}
    bound_at = {n: med[name] for name, n in BOUNDS.items()}
    rows = [[name, m, workers[name], m / (workers[name] * med["ddp, 1 worker"]),
             m / bound_at[workers[name]]] for name, m in med.items()]
    print(f"\nP2 on {common.machine()}; {base.model} {base.hidden} on {base.data}, batch "
          f"{base.batch_size}, {base.optimizer}; medians of {len(rates['ddp, 1 worker'])} epochs")
    print(common.markdown(["variant", "median samples/s", "workers", "efficiency vs ideal N",
                           "vs bound (same N)"], rows))
    print(f"\nP2a ddp local SGD k=16, 2 workers / bound 2: "
          f"{med['ddp, 2 workers, local SGD k=16'] / bound_at[2]:.3f} (target >= 0.95)")
    print(f"P2c ddp 1 worker / bound 1: {med['ddp, 1 worker'] / bound_at[1]:.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
