"""Loopback point-to-point cost (gloo), for each message size. Under torchrun, rank 0 prints one
JSON line {bytes: seconds}; bench/plan_check.py calls `measure` in two Ray actors instead.

Idle (default): half a send/recv round trip between two waiting processes.

With --forward-ms F0,F1 --backward-ms B0,B1, as between 2 pipeline stages in full flow: the two
ranks run GPipe's traffic for M micro-batches (rank 0 sends activations, rank 1 gradients, each
on a fresh buffer as a stage does) with each forward and backward replaced by computing for the
given time. A message then costs what it costs in a pipeline: its receiver usually asks while
the sender is mid-compute, and gloo moves a message only once its receiver asks (on the 2-core
development VM: 1-2 ms per message whatever its size between two Ray actors, 0.6-0.9 ms between
two torchrun ranks, against 0.1-0.4 ms between two ranks that are waiting). Per message: (step
time - the schedule's time without messages) / (M + 1), the messages on stage 0's path (M - 1
between micro-batches, one each way to fill and drain), as raydist plan counts them.

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


def gpipe(size: int, rank: int, forward_ms: list[float], backward_ms: list[float],
          microbatches: int) -> float:
    """One step of 2-stage GPipe traffic: seconds per message beyond the schedule's compute."""
    sending = []

    def receive(src: int) -> None:
        dist.recv(torch.empty(max(1, size // 4)), src)

    def send(dst: int) -> None:
        buffer = torch.ones(max(1, size // 4))
        sending.append((dist.isend(buffer, dst), buffer))

    start = time.perf_counter()
    for compute_ms, sender in ((forward_ms, 0), (backward_ms, 1)):  # activations, then gradients
        for _ in range(microbatches):
            if rank != sender:
                receive(sender)
            spin(compute_ms[rank])
            if rank == sender:
                send(1 - sender)
    for work, _ in sending:
        work.wait()
    dist.barrier()  # both ranks start the next step together, as the driver's call makes them
    ideal = microbatches * (forward_ms[0] + backward_ms[0]) + forward_ms[1] + backward_ms[1]
    return (time.perf_counter() - start - ideal / 1e3) / (microbatches + 1)


def measure(sizes: list[int], repeats: int = 50, forward_ms: list[float] | None = None,
            backward_ms: list[float] | None = None, microbatches: int = 8) -> dict[int, float]:
    """In an initialised process group of two: {bytes: median seconds of a message} on rank 0,
    idle or (given each rank's forward and backward time) in GPipe's flow."""
    rank, out = dist.get_rank(), {}
    for size in sizes:  # the first of each size warms up: connections and buffers
        if forward_ms and backward_ms:
            times = [gpipe(size, rank, forward_ms, backward_ms, microbatches)
                     for _ in range(1 + max(5, repeats // 4))]
        else:
            t = torch.ones(max(1, size // 4))
            times = [idle(t, rank) for _ in range(1 + repeats)]
        out[size] = statistics.median(times[1:])
    return out


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bytes", required=True, help="comma-separated message sizes")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--forward-ms", type=floats, help="F0,F1: each rank's forward per micro-batch")
    p.add_argument("--backward-ms", type=floats, help="B0,B1: each rank's backward per micro-batch")
    p.add_argument("--microbatches", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = measure([int(b) for b in args.bytes.split(",")], args.repeats, args.forward_ms,
                  args.backward_ms, args.microbatches)
    if dist.get_rank() == 0:
        print(json.dumps(out), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
