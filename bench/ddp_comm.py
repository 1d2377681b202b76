"""Communication-efficient ddp: plain DDP, fp16 and bf16 gradients, PowerSGD (rank 1 and 4) and
local SGD (k = 4 and 16), each on 2 workers x 1 thread, against ddp on 1 worker x 1 thread,
measured side by side in one process tree.

    .venv/bin/python bench/ddp_comm.py --reps 5

The compute-bound benchmark MLP (hidden 1024,1024,512: 1.6 M parameters) on digits, global
batch 256 (6 steps per epoch: 1437 training samples), adam at its default lr. Each round runs
every variant once, in turn, all with the round's seed (round r: seed r), so load drift and
seed luck hit every variant alike; a warm-up round comes first and is not counted.

- step time: epoch time / steps per epoch, epochs after the first; median over rounds x epochs.
- scaling efficiency: t1 / (2 t2) = throughput(2) / throughput(1) / 2, same global batch
  (docs/design.md, "Metrics"); t1 is the 1-worker run, where no variant sends anything.
- bytes/step: all bytes the workers put on the wire per global step
  (raydist/strategies/ddp/comm.py), mean over every step of the counted runs.
- comm wait: the workers' mean communication not hidden behind backward, per step
  (raydist/strategies/ddp/comm.py), mean over the timed epochs.
- final accuracy: val_accuracy after the last epoch, median over rounds (one seed each).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import common
import ray

from raydist.data import load_data
from raydist.engine import Record, global_batches

BASELINE = "ddp, 1 worker"
PLAIN = "plain ddp"
VARIANTS: dict[str, dict[str, Any]] = {
    BASELINE: {"workers": 1},
    PLAIN: {"workers": 2},
    "fp16": {"workers": 2, "grad_compression": "fp16"},
    "bf16": {"workers": 2, "grad_compression": "bf16"},
    "PowerSGD rank 1": {"workers": 2, "grad_compression": "powersgd", "powersgd_rank": 1},
    "PowerSGD rank 4": {"workers": 2, "grad_compression": "powersgd", "powersgd_rank": 4},
    "local SGD k=4": {"workers": 2, "local_sgd_steps": 4},
    "local SGD k=16": {"workers": 2, "local_sgd_steps": 16},
}
TARGET_EFFICIENCY = 0.85
TARGET_POINTS = 0.5  # accuracy points below plain ddp that still count


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="counted rounds")
    p.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted")
    p.add_argument("--epochs", type=int, default=15, help="epochs per run; the first is not timed")
    args = p.parse_args(argv)

    base = common.spec(strategy="ddp", data="digits", batch_size=256, optimizer="adam", lr=None,
                       epochs=args.epochs)
    steps = len(global_batches(base, load_data(base), 1))
    runs: dict[str, list[list[Record]]] = {name: [] for name in VARIANTS}
    common.start_ray()
    for rnd in range(args.warmup + args.reps):
        seed = max(0, rnd - args.warmup)
        for name, changes in VARIANTS.items():
            records = common.raydist_records(base.replace(seed=seed, **changes))
            if rnd >= args.warmup:
                runs[name].append(records)
        print(f"{'warm-up' if rnd < args.warmup else 'round'} {rnd + 1}/{args.warmup + args.reps} "
              "done", file=sys.stderr, flush=True)
    ray.shutdown()
    print(f"\nddp communication on {common.machine()}; {base.model} {base.hidden} on {base.data}, "
          f"batch {base.batch_size} ({steps} steps/epoch), {base.optimizer}, {args.epochs} epochs, "
          f"1 thread per worker; {args.reps} rounds")
    print(table(runs, steps))


def table(runs: dict[str, list[list[Record]]], steps: int) -> str:
    step_s = {name: [t / steps for r in rs for t in common.steady(r)] for name, rs in runs.items()}
    t1 = common.median(step_s[BASELINE])
    final = {name: common.median([r[-1]["val_accuracy"] for r in rs]) for name, rs in runs.items()}
    rows = []
    for name in VARIANTS:
        t = common.median(step_s[name])
        workers = VARIANTS[name]["workers"]
        efficiency = t1 / (workers * t)
        # means, not medians: local SGD with k > steps per epoch averages in some epochs only
        sent = statistics.fmean(e["bytes_per_step"] for r in runs[name] for e in r)
        wait = statistics.fmean(e / steps for r in runs[name] for e in common.steady(r, "comm_wait_s"))
        points = 100 * (final[name] - final[PLAIN])
        meets = efficiency >= TARGET_EFFICIENCY and points >= -TARGET_POINTS
        rows.append([name, 1000 * t1, 1000 * t, efficiency, f"{sent / 1e6:.3f}", 1000 * wait,
                     final[name], f"{points:+.1f}", "" if workers == 1 else ("yes" if meets else "no")])
    return common.markdown(["variant", "step ms, 1 worker", "step ms", "scaling efficiency",
                            "MB/step", "comm wait ms/step", "final val acc",
                            "points vs plain", f"eff >= {TARGET_EFFICIENCY}, acc >= plain - "
                            f"{TARGET_POINTS}"], rows)


if __name__ == "__main__":
    main()
