"""What `pipeline` costs: K stages, one actor each, M micro-batches of m = ceil(B / M) samples.

Step time for a global batch of B samples, the blocks cut where the strategy cuts them by
default (balanced by parameters). Stage k (h_k: the sum of its blocks' share_j) computes a
micro-batch's forward + backward in t_k = h_k (compute(m) - opt) s(c), c = sum_k h_k / max_k h_k
(stages busy, on average, while the slowest one is); each cut passes m a_cut bytes per
micro-batch each way. GPipe and 1F1B:

    sum_k t_k + (M - 1) max_k (t_k + sum over k's cuts of t(m a_cut))
    + sum over cuts of 2 t(m a_cut) + opt (largest stage's share of parameters)

the first micro-batch fills the pipe and the last drains it (one message each way over every
cut); in between the slowest stage sets the pace, and each message it receives costs t(): gloo
moves a message only once its receiver asks, however early the sender posted it, and the sender
is then mid-compute (so the p2p transport is measured in a pipeline's flow, see
bench/plan_check.py); every stage steps at the flush. Nan for K > blocks.

Bytes per worker: stage k's blocks' P + G + O, and activations of the micro-batches it holds at
once (counted from the schedule's op order: GPipe all M, 1F1B at most K - k), each of m
samples; the worst stage (the cuts: the spec's where they make K stages, else the strategy's
default). P, G, O, a_j: raydist/memory/footprint.py.
"""

from __future__ import annotations

import itertools
import math

from raydist.memory.footprint import Layout, Sizes, Worker
from raydist.steptime import Costs, Network, compute, slowdown
from raydist.strategies.pipeline.cuts import balanced_cuts
from raydist.strategies.pipeline.schedules import SCHEDULES, chunks_of

TRANSPORT = "p2p"
"""gloo point to point between neighbouring stages."""
SHARDS = True
"""More stages split the model state further."""
HOLDS = "a stage's parameters, gradients and {opt} state"
"""What a worker's model state is, as the pre-flight's memory refusal says it."""


def balanced_bounds(c: Costs, k: int) -> list[int]:
    """[0, cut_1, ..., blocks]: the strategy's default cut (balanced by parameters) of Costs' blocks."""
    return [0, *balanced_cuts(c.block_params, k), len(c.block_params)]


def stage_times(c: Costs, batch: int, k: int, m: int) -> list[float]:
    """t_k: each of k stages' forward + backward of one micro-batch, while they compute at once."""
    bounds = balanced_bounds(c, k)
    shares = [sum(c.block_share[a:b]) for a, b in itertools.pairwise(bounds)]
    busy = sum(shares) / max(shares)  # stages computing, on average, while the slowest one does
    return [(compute(c, math.ceil(batch / m)) - c.optimizer_s) * slowdown(c, busy) * share
            for share in shares]


def predicted_step(c: Costs, net: Network, batch: int, n: int, microbatches: int = 1) -> float:
    """n: stages."""
    k, m = n, microbatches
    if k > len(c.block_params):
        return math.nan
    micro = math.ceil(batch / m)
    bounds = balanced_bounds(c, k)
    t = stage_times(c, batch, k, m)
    cuts = {cut: micro * c.block_out_bytes[cut - 1] for cut in bounds[1:-1]}  # bytes per message
    # gloo moves a message only once its receiver asks for it: receiving what a neighbour sent
    # long ago still costs a message's time (the sender, computing, answers when it gets a core)
    cycle = [t[i] + sum(net.time(b) for cut, b in cuts.items() if cut in bounds[i : i + 2])
             for i in range(k)]
    fill = sum(2 * net.time(b) for b in cuts.values())
    params = max(sum(c.block_params[a:b]) for a, b in itertools.pairwise(bounds))
    flush = c.optimizer_s * params / sum(c.block_params)
    return sum(t) + (min(m, batch) - 1) * max(cycle) + fill + flush


def in_flight(schedule: str, stage: int, stages: int, m: int, chunks: int) -> int:
    """The most micro-batch chunks stage `stage` holds at once under `schedule`: forwards not yet
    through their backward (a split backward: their weight pass), counted along its ops."""
    entry, most, now = SCHEDULES[schedule], 0, 0
    done = "W" if entry.split_backward else "B"
    for kind, _, _ in entry.ops(stage, stages, m, chunks):
        now += (kind == "F") - (kind == done)
        most = max(most, now)
    return most


def worker_bytes(s: Sizes, lay: Layout) -> list[Worker]:
    chunks = chunks_of(lay.schedule, lay.virtual_stages)
    pieces = lay.n * chunks
    if pieces > len(s.params):
        return []
    fits = lay.cuts is not None and len(lay.cuts) == pieces - 1  # the spec's cuts, for its K
    bounds = [0, *(lay.cuts if fits else balanced_cuts(s.params, pieces)), len(s.params)]
    m = min(lay.microbatches, lay.batch)
    micro = math.ceil(lay.batch / m)
    workers = []
    for k in range(lay.n):
        mine = [(a, b) for j, (a, b) in enumerate(itertools.pairwise(bounds)) if j % lay.n == k]
        p = sum(sum(s.params[a:b]) for a, b in mine)
        o = sum(sum(s.state[a:b]) for a, b in mine)
        per_chunk = sum(sum(s.out[a:b]) for a, b in mine) / len(mine)
        held_now = in_flight(lay.schedule, k, lay.n, m, chunks)
        workers.append(Worker(f"stage {k}", 2 * p + o, held_now * micro * per_chunk))
    return workers
