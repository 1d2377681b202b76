"""What `local` costs: one process on the whole global batch, nothing exchanged.

- step time for a global batch of B samples: compute(B), the engine's step alone on its node
  (what every data-parallel strategy's step comes to at N = 1);
- bytes: P + G + O + buffers; activations of all B samples.

P, G, O, a_j: raydist/memory/footprint.py; compute(b): raydist/steptime.
"""

from __future__ import annotations

from raydist.memory.footprint import Layout, Sizes, Worker, held
from raydist.steptime import Costs, Network, compute

TRANSPORT = None
"""It sends no messages."""
SHARDS = False
"""Its one process holds the whole model state."""
HOLDS = "parameters, gradients and {opt} state"
"""What its worker's model state is, as the pre-flight's memory refusal says it."""


def predicted_step(c: Costs, net: Network, batch: int, n: int, microbatches: int = 1) -> float:
    """One process whatever N: the whole batch at once."""
    return compute(c, batch)


def worker_bytes(s: Sizes, lay: Layout) -> list[Worker]:
    return [Worker("rank 0", held(s) + s.buffers, lay.batch * sum(s.out))]
