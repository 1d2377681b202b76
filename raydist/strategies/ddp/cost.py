"""What `ddp` costs: N replicas, every gradient all-reduced over a ring each step.

Step time for a global batch of B samples, b = ceil(B / N) samples per worker:

    compute(b) s(N) + 2 (N-1)/N S / bw + 2 (N-1) latency            (ring all-reduce)

each worker computes its shard, slowed by the N computing at once (s, raydist/steptime); then
DDP's ring all-reduce passes 2 (N-1)/N of the S gradient bytes through every worker, in
2 (N-1) messages.

Bytes per worker: P + G + O (shard_optimizer, ZeRO-1: O / N) + buffers; activations of b
samples (P, G, O, a_j: raydist/memory/footprint.py).
"""

from __future__ import annotations

import math

from raydist.memory.footprint import Layout, Sizes, Worker
from raydist.steptime import Costs, Network, compute, ring, slowdown

TRANSPORT = "allreduce"
"""gloo's ring all-reduce: the network plan predicts it on (bench/plan_check.py measures it)."""
SHARDS = False
"""Every replica holds the whole model (ZeRO-1 splits only the optimizer state)."""
HOLDS = "parameters, gradients and {opt} state"
"""What a worker's model state is, as the pre-flight's memory refusal says it."""


def predicted_step(c: Costs, net: Network, batch: int, n: int, microbatches: int = 1) -> float:
    return compute(c, math.ceil(batch / n)) * slowdown(c, n) + ring(net, c.grad_bytes, n)


def worker_bytes(s: Sizes, lay: Layout) -> list[Worker]:
    opt = sum(s.state) / (lay.n if lay.shard_optimizer else 1)
    return [Worker("rank", 2 * sum(s.params) + opt + s.buffers, math.ceil(lay.batch / lay.n) * sum(s.out))]
