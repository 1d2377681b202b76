"""Loopback all-reduce cost under torchrun (gloo): median time of an all-reduce of each size.
Rank 0 prints one JSON line {bytes: seconds}.

    python -m torch.distributed.run --nproc_per_node 2 bench/peers/gloo_allreduce.py --bytes 65536,6584360
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bytes", required=True, help="comma-separated message sizes")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = {}
    for size in (int(b) for b in args.bytes.split(",")):
        t = torch.ones(size // 4)
        dist.all_reduce(t)  # warm-up: connections and buffers
        times = []
        for _ in range(args.repeats):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - start)
        out[size] = statistics.median(times)
    if dist.get_rank() == 0:
        print(json.dumps(out), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
