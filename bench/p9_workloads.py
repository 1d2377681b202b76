"""P9: the workloads people scale, side by side: samples/s of `resnet` on `images` and of a
~10 M-parameter `gpt` on `text` under local (1 and 2 threads), ddp on 2 workers x 1 thread
and a 2-stage pipeline x 1 thread.

    .venv/bin/python bench/p9_workloads.py --reps 1

On a 2-core machine two workers or stages are as many processes as cores: the bound of any
2-process strategy is local with 2 threads' throughput at best (compute-bound steps), and
ddp / pipeline pay their communication on top. samples/s is the median over the steady epochs
(all but the first) of every round.
"""

from __future__ import annotations

import argparse

import common
import ray

WORKLOADS = {
    # ResNet-18's layout (BasicBlocks, 4 stages) at a quarter of its width: 0.7 M parameters
    "resnet": {"model": "resnet", "data": "images", "channels": 16, "samples": 1280,
               "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "epochs": 3},
    # ~10 M parameters: 6 blocks of width 384
    "gpt": {"model": "gpt", "data": "text", "layers": 6, "d_model": 384, "heads": 6, "seq_len": 64,
            "text_chars": 12000, "batch_size": 32, "optimizer": "adam", "lr": 3e-4, "epochs": 3},
}
VARIANTS = {"local, 1 thread": {"strategy": "local", "threads_per_worker": 1},
            "local, 2 threads": {"strategy": "local", "threads_per_worker": 2},
            "ddp, 2 workers": {"strategy": "ddp", "workers": 2, "threads_per_worker": 1},
            "pipeline, 2 stages": {"strategy": "pipeline", "stages": 2, "microbatches": 4,
                                   "threads_per_worker": 1}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    args = p.parse_args()
    common.start_ray()
    for name in args.workloads.split(","):
        specs = {v: common.RunSpec.from_dict({**WORKLOADS[name], **changes})
                 for v, changes in VARIANTS.items()}
        params = sum(p.numel() for p in common.build_model(specs["local, 1 thread"]).parameters())
        runs = {v: (lambda s=s: common.steady(common.raydist_records(s), "samples_per_s"))
                for v, s in specs.items()}
        rates = common.alternate(runs, args.reps, warm_up=False)
        med = {v: common.median(r) for v, r in rates.items()}
        one = med["local, 1 thread"]
        print(f"\nP9 {name} ({params / 1e6:.2f} M parameters) on {common.machine()}; "
              f"{WORKLOADS[name]}; medians of {len(rates['local, 1 thread'])} steady epochs")
        print(common.markdown(["variant", "samples/s", "vs local 1 thread"],
                              [[v, m, m / one] for v, m in med.items()]))
    ray.shutdown()


if __name__ == "__main__":
    main()
