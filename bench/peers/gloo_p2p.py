"""Loopback point-to-point cost (gloo), for each message size: the median time of a receive.
Under torchrun, rank 0 prints one JSON line {bytes: seconds}; bench/plan_check.py calls
`measure` in two Ray actors instead.

Idle (default): half a send/recv round trip between two waiting processes. With --busy-ms D, as
between pipeline stages in full flow: both ranks compute D ms per message; rank 1 posts each
message (isend) before computing, rank 0 receives it after computing, so the sender is busy when
the receiver asks (gloo moves a message only once its receiver asks for it).

    python -m torch.distributed.run --nproc_per_node 2 bench/peers/gloo_p2p.py --bytes 4096,262144
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist


def spin(ms: float) -> None:
    """Compute on this process's one thread for `ms` milliseconds."""
    x, end = torch.ones(128, 128), time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        x = (x @ x).clamp_(-1, 1)


def idle(t: torch.Tensor, rank: int) -> float:
    start = time.perf_counter()
    if rank == 0:
        dist.send(t, 1)
        dist.recv(t, 1)
    else:
        dist.recv(t, 0)
        dist.send(t, 0)
    return (time.perf_counter() - start) / 2


def busy(t: torch.Tensor, rank: int, ms: float) -> float:
    if not ms:
        return idle(t, rank)
    if rank == 1:
        work = dist.isend(t, 0)
        spin(ms)
        work.wait()
        return 0.0
    spin(ms)
    start = time.perf_counter()
    dist.recv(t, 1)
    return time.perf_counter() - start


def measure(sizes: list[int], repeats: int = 50, busy_ms: float = 0.0) -> dict[int, float]:
    """In an initialised process group of two: {bytes: median seconds of a receive} on rank 0."""
    rank, out = dist.get_rank(), {}
    for size in sizes:
        t = torch.ones(max(1, size // 4))
        busy(t, rank, busy_ms)  # warm-up: connections and buffers
        out[size] = statistics.median(busy(t, rank, busy_ms) for _ in range(repeats))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bytes", required=True, help="comma-separated message sizes")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--busy-ms", type=float, default=0.0, help="compute per message on both ranks")
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = measure([int(b) for b in args.bytes.split(",")], args.repeats, args.busy_ms)
    if dist.get_rank() == 0:
        print(json.dumps(out), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
