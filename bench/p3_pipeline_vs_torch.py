"""P3: raydist pipeline (2 stage actors x 1 thread, M = 8) against torch.distributed.pipelining
(2 ranks under torchrun, gloo) with the same cut, for GPipe and 1F1B: steady-state throughput.

    .venv/bin/python bench/p3_pipeline_vs_torch.py --reps 5
"""

from __future__ import annotations

import argparse

import common
import ray

SCHEDULES = ("gpipe", "1f1b")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--microbatches", type=int, default=8)
    args = p.parse_args()
    specs = {s: common.spec(strategy="pipeline", stages=2, microbatches=args.microbatches, schedule=s)
             for s in SCHEDULES}
    variants = {}
    for s, spec in specs.items():
        variants[f"raydist {s}"] = lambda spec=spec: common.steady(common.raydist_records(spec))
        variants[f"torch {s}"] = lambda spec=spec, s=s: common.torchrun(
            "torch_pipeline.py", 2, [*common.peer_args(spec), "--schedule", s])["epoch_times"][1:]
    common.start_ray()
    times = common.alternate(variants, args.reps)
    ray.shutdown()
    n = common.samples(specs["gpipe"])
    rows = []
    for s in SCHEDULES:
        ours, peer = common.median(times[f"raydist {s}"]), common.median(times[f"torch {s}"])
        rows.append([s, n / ours, n / peer, peer / ours])
    print(f"\nP3 on {common.machine()}; {specs['gpipe'].model} {specs['gpipe'].hidden}, batch "
          f"{specs['gpipe'].batch_size}, 2 stages, M = {args.microbatches}; medians of "
          f"{len(times['raydist gpipe'])} epochs")
    print(common.markdown(["schedule", "raydist samples/s", "torch.distributed.pipelining samples/s",
                           "throughput ratio raydist / torch"], rows))


if __name__ == "__main__":
    main()
