"""Loopback all-reduce cost (gloo): median time of an all-reduce of each size. Under torchrun,
rank 0 prints one JSON line {bytes: seconds}; bench/plan_check.py calls `measure` in two Ray
actors instead.

    python -m torch.distributed.run --nproc_per_node 2 bench/peers/gloo_allreduce.py --bytes 65536,6584360
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist


def measure(sizes: list[int], repeats: int = 30) -> dict[int, float]:
    """In an initialised process group: {bytes: median seconds of an all-reduce}."""
    out = {}
    for size in sizes:
        t = torch.ones(size // 4)
        dist.all_reduce(t)  # warm-up: connections and buffers
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - start)
        out[size] = statistics.median(times)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bytes", required=True, help="comma-separated message sizes")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = measure([int(b) for b in args.bytes.split(",")], args.repeats)
    if dist.get_rank() == 0:
        print(json.dumps(out), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
