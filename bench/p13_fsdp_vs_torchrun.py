"""P13: raydist fsdp (2 workers x 1 thread, Ray Train, gloo) against plain PyTorch FSDP2 under
`torchrun --nproc_per_node 2` (gloo), same model, data, batch order and units (one per block,
then the root): steady-state epoch time. P1's protocol, with fsdp for ddp.

    .venv/bin/python bench/p13_fsdp_vs_torchrun.py --reps 5
"""

from __future__ import annotations

import argparse

import common
import ray


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo",
                   help="nccl: every worker and rank on its own GPU")
    args = p.parse_args()
    gpu = args.backend == "nccl"
    spec = common.spec(strategy="fsdp", workers=args.workers, use_gpu=gpu)
    peer_args = [*common.peer_args(spec), "--backend", args.backend]
    common.start_ray()
    times = common.alternate({
        "raydist fsdp": lambda: common.steady(common.raydist_records(spec)),
        "torchrun FSDP2": lambda: common.torchrun("torch_fsdp.py", args.workers, peer_args)[
            "epoch_times"][1:],
    }, args.reps)
    ray.shutdown()
    ours, peer = common.median(times["raydist fsdp"]), common.median(times["torchrun FSDP2"])
    where = (f"{args.workers} GPUs ({common.gpu_name()}), nccl" if gpu
             else f"{args.workers} workers x 1 thread")
    print(f"\nP13 on {common.machine()}; {spec.model} {spec.hidden} on {spec.data}, batch "
          f"{spec.batch_size}, {where}; medians of {len(times['raydist fsdp'])} epochs")
    print(common.markdown(["side", "median epoch s", "raydist / peer"],
                          [["raydist fsdp", ours, ours / peer], ["torchrun FSDP2", peer, 1.0]]))


if __name__ == "__main__":
    main()
