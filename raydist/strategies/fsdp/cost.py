"""What `fsdp` costs: N workers each holding 1/N of the model state, every block's parameters
gathered when it computes.

Step time for a global batch of B samples, b = ceil(B / N) samples per worker:

    compute(b) s(N) + 3 (N-1)/N S / bw + 3 (N-1) latency x blocks

every block's parameters are all-gathered for the forward and again for the backward, and its
gradients reduce-scattered: 3 (N-1)/N S on the wire per worker, per step, each block its own
three collectives (half a ring all-reduce each, raydist/steptime).

Bytes per worker: (P + G + O) / N + the largest block's P gathered (its other (N-1)/N, while it
computes) + buffers; activations of b samples (P, G, O, a_j: raydist/memory/footprint.py).
"""

from __future__ import annotations

import math

from raydist.memory.footprint import Layout, Sizes, Worker, held
from raydist.steptime import Costs, Network, compute, slowdown

TRANSPORT = "allreduce"
"""gloo's collectives: all-gather and reduce-scatter are the two halves of its ring all-reduce."""
SHARDS = True
"""More workers split the model state further."""
HOLDS = "its shard of parameters, gradients and {opt} state, and the largest block gathered"
"""What a worker's model state is, as the pre-flight's memory refusal says it."""


def predicted_step(c: Costs, net: Network, batch: int, n: int, microbatches: int = 1) -> float:
    gather = 3 * (n - 1) / n * c.grad_bytes / net.bandwidth + 3 * (n - 1) * net.latency * len(c.block_params)
    return compute(c, math.ceil(batch / n)) * slowdown(c, n) + gather


def worker_bytes(s: Sizes, lay: Layout) -> list[Worker]:
    gathered = max(s.params) * (lay.n - 1) / lay.n  # the rest of the largest block, while it computes
    return [Worker("rank", held(s) / lay.n + gathered + s.buffers,
                   math.ceil(lay.batch / lay.n) * sum(s.out))]
