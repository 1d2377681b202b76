"""What `tp` costs: the layers between the first block and the last split over N ranks
(Megatron-LM's column-then-row pairs), every rank on the whole batch.

Step time for a global batch of B samples:

    compute(B) s(N) (h / N + 1 - h) + 4 ring all-reduces of B a_j per block j between the
    first and the last, each 2 (N-1)/N B a_j / bw + 2 (N-1) latency

h = the sum of those blocks' share_j: assumed split evenly over the N ranks, the first and last
block (embedding, head) computed whole by each; two all-reduces in the forward and two in the
backward of a transformer block's attention and MLP pairs.

Bytes per worker: the sharded layers' P + G + O / N, the rest whole, + buffers; activations of
B samples (every rank sees the whole batch). Sharded: the nn.Linear layers of every block
between the first and the last; embeddings, norms and the head stay replicated (P, G, O, a_j:
raydist/memory/footprint.py).
"""

from __future__ import annotations

from raydist.memory.footprint import Layout, Sizes, Worker, held
from raydist.steptime import Costs, Network, compute, ring, slowdown

TRANSPORT = "allreduce"
"""gloo's all-reduce, inside DTensor's forward and backward."""
SHARDS = True
"""More workers split its layers further."""
HOLDS = "its shards of the split layers, the rest whole, with {opt} state"
"""What a worker's model state is, as the pre-flight's memory refusal says it."""


def predicted_step(c: Costs, net: Network, batch: int, n: int, microbatches: int = 1) -> float:
    split = sum(c.block_share[1:-1])
    work = compute(c, batch) * slowdown(c, n) * (split / n + 1 - split)
    return work + sum(4 * ring(net, batch * a, n) for a in c.block_out_bytes[1:-1])


def worker_bytes(s: Sizes, lay: Layout) -> list[Worker]:
    share = [sh / p if p else 0.0 for sh, p in zip(s.sharded, s.params, strict=True)]
    split = sum(f * (2 * p + o) for f, p, o in zip(share, s.params, s.state, strict=True))
    return [Worker("rank", held(s) - split + split / lay.n + s.buffers, lay.batch * sum(s.out))]
