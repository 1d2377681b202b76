"""P1: raydist ddp (2 workers x 1 thread, Ray Train, gloo) against plain PyTorch DDP under
`torchrun --nproc_per_node 2` (gloo), same model, data and batch order: steady-state epoch time.

    .venv/bin/python bench/p1_ddp_vs_torchrun.py --reps 5
    .venv/bin/python bench/p1_ddp_vs_torchrun.py --reps 5 --workers 1 --backend nccl   # 1 GPU
    .venv/bin/python bench/p1_ddp_vs_torchrun.py --reps 3 --efficiency                # P2b

--efficiency (P2b): both sides on 1 worker too, in the same rounds; each side's scaling
efficiency = epoch time(1) / (N x epoch time(N)), and P2b = raydist's / torchrun's.
"""

from __future__ import annotations

from collections.abc import Callable

import common
import ray


def main() -> None:
    p = common.peer_parser(__doc__)
    p.add_argument("--efficiency", action="store_true",
                   help="P2b: also both sides on 1 worker, and each side's scaling efficiency")
    args = p.parse_args()
    if args.efficiency:
        efficiency(args.reps, args.workers)
    else:
        common.against_torchrun("P1", "ddp", "torchrun DDP", "torch_ddp.py", args)


def sides(workers: int) -> dict[str, Callable[[], list[float]]]:
    spec = common.spec(strategy="ddp", workers=workers)
    return {f"raydist ddp, {workers}": lambda: common.steady(common.raydist_records(spec)),
            f"torchrun DDP, {workers}": lambda: common.torchrun(
                "torch_ddp.py", workers, common.peer_args(spec))["epoch_times"][1:]}


def efficiency(reps: int, workers: int) -> None:
    """P2b: plain ddp's scaling efficiency against torchrun DDP's, same config, one run."""
    common.start_ray()
    times = common.alternate({**sides(1), **sides(workers)}, reps)
    ray.shutdown()
    med = {name: common.median(t) for name, t in times.items()}
    rows, eff = [], {}
    for side in ("raydist ddp", "torchrun DDP"):
        one, many = med[f"{side}, 1"], med[f"{side}, {workers}"]
        eff[side] = one / (workers * many)
        rows.append([side, one, many, eff[side]])
    print(f"\nP2b on {common.machine()}; {common.BENCH['model']} {common.BENCH['hidden']}, batch "
          f"{common.BENCH['batch_size']}; medians of {len(times['raydist ddp, 1'])} epochs")
    print(common.markdown(["side", "epoch s, 1 worker", f"epoch s, {workers} workers",
                           "scaling efficiency"], rows))
    print(f"\nP2b raydist / torchrun efficiency: {eff['raydist ddp'] / eff['torchrun DDP']:.3f} "
          "(target >= 0.97)")


if __name__ == "__main__":
    main()
