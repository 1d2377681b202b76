"""What `ps` costs (sync mode): N replicas compute gradients, P servers sum them and step.

Step time for a global batch of B samples, b = ceil(B / N) samples per replica:

    (compute(b) - opt) s(N) + opt / P + 2 latency + (N + nodes) S / (P bw)

the replicas compute gradients only; each server steps its 1/P of the tensors; the servers'
links carry N gradients in and one copy of the weights out per node (replicas on one node share
it in the object store), nodes = ceil(N / workers per node).

Bytes per worker: a replica P + G + buffers, activations of b samples; a server P + O of the
tensors it owns (split as the strategy splits them; the summed gradient is dropped after each
step). P, G, O, a_j: raydist/memory/footprint.py.
"""

from __future__ import annotations

import math

from raydist.memory.footprint import Layout, Sizes, Worker
from raydist.steptime import Costs, Network, compute, slowdown
from raydist.strategies.ps.sharding import balance

TRANSPORT = "object_store"
"""Actor to actor through Ray's object store."""
SHARDS = False
"""Every replica holds the whole model (the servers split the optimizer state, not the replicas)."""
HOLDS = "a replica's parameters and gradients, or a server's share with {opt} state"
"""What a worker's model state is, as the pre-flight's memory refusal says it."""


def predicted_step(c: Costs, net: Network, batch: int, n: int, microbatches: int = 1,
                   servers: int = 1) -> float:
    replica = (compute(c, math.ceil(batch / n)) - c.optimizer_s) * slowdown(c, n)
    nodes = math.ceil(n / c.workers_per_node)
    link = 2 * net.latency + (n + nodes) * c.grad_bytes / (servers * net.bandwidth)
    return replica + c.optimizer_s / servers + link


def worker_bytes(s: Sizes, lay: Layout) -> list[Worker]:
    """Servers own whole tensors, split as the strategy splits them (largest first onto the
    least-loaded server); without per-tensor sizes, evenly."""
    replica = Worker("replica", 2 * sum(s.params) + s.buffers, math.ceil(lay.batch / lay.n) * sum(s.out))
    if not s.tensors:
        return [replica, Worker("server", (sum(s.params) + sum(s.state)) / lay.servers, 0.0)]
    owned = balance([b for b, _ in s.tensors], lay.servers)
    return [replica, *(Worker(f"server {i}", sum(sum(s.tensors[t]) for t in idx), 0.0)
                       for i, idx in enumerate(owned))]
