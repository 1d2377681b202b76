"""The peer of raydist's pipeline: torch.distributed.pipelining under torchrun (gloo), one stage
per rank (interleaved-1f1b: V = 2 stages per rank, stage c*K + rank, as raydist places its
chunks), the same cut of the same model (raydist's balanced cut), the same batches.
Rank 0 prints one JSON line with the steady-state epoch times.

    python -m torch.distributed.run --nproc_per_node 2 bench/peers/torch_pipeline.py \
        --spec '{...}' --schedule gpipe
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from raydist.config import RunSpec
from raydist.data import batch_order, load_data
from raydist.models import build_model
from raydist.strategies.pipeline.cuts import stage_bounds

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B}
CHUNKS = {"interleaved-1f1b": 2}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True, help="RunSpec fields as JSON")
    p.add_argument("--schedule", choices=SCHEDULES, default="gpipe")
    args = p.parse_args()
    spec = RunSpec.from_dict(json.loads(args.spec))
    torch.set_num_threads(spec.threads_per_worker)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(spec.seed)
    data = load_data(spec)
    model = build_model(spec, data)
    v = CHUNKS.get(args.schedule, 1)
    bounds = stage_bounds(spec.replace(stages=world, schedule=args.schedule), model)
    ids = [c * world + rank for c in range(v)]
    parts = [model[bounds[i]:bounds[i + 1]] for i in ids]
    stages = [PipelineStage(part, i, world * v, torch.device("cpu"))
              for part, i in zip(parts, ids, strict=True)]

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(out, y, reduction="sum") / spec.batch_size

    chosen = stages if v > 1 else stages[0]
    schedule = SCHEDULES[args.schedule](chosen, n_microbatches=spec.microbatches, loss_fn=loss_fn)
    opt = torch.optim.SGD([q for part in parts for q in part.parameters()], lr=spec.lr)
    epoch_times = []
    for epoch in range(1, spec.epochs + 1):
        t = time.perf_counter()
        for batch in batch_order(data.n_train, spec.batch_size, spec.seed, epoch):
            opt.zero_grad(set_to_none=True)
            if rank == 0:
                schedule.step(data.x_train[batch])
            else:
                schedule.step(target=data.y_train[batch], losses=[])
            opt.step()
        epoch_times.append(time.perf_counter() - t)
    if rank == 0:
        print(json.dumps({"epoch_times": epoch_times, "samples": data.n_train}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
