"""The peer of raydist's fsdp: plain PyTorch FSDP2 under torchrun (gloo), fully_shard on each of
the model's top-level blocks and then on the root (as raydist's fsdp/parallelize.py does), nothing
of raydist's but the model and data builders (the same network, samples and order on both
sides). Rank 0 prints one JSON line: epoch times and when the first step began. --backend nccl
puts rank r on GPU r.

    python -m torch.distributed.run --nproc_per_node 2 bench/peers/torch_fsdp.py --spec '{...}'
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from raydist.config import RunSpec
from raydist.data import batch_order, load_data
from raydist.models import build_model

LOSS = {"bce": F.binary_cross_entropy_with_logits, "ce": F.cross_entropy, "mse": F.mse_loss}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True, help="RunSpec fields as JSON")
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo", help="nccl: one GPU per rank")
    args = p.parse_args()
    spec = RunSpec.from_dict(json.loads(args.spec))
    torch.set_num_threads(spec.threads_per_worker)
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if args.backend == "nccl" else "cpu")
    torch.manual_seed(spec.seed)
    data = load_data(spec)
    x, y = data.x_train.to(device), data.y_train.to(device)
    model = build_model(spec, data).to(device)
    mesh = init_device_mesh(device.type, (world,))
    for block in model:  # every registered model is an nn.Sequential of blocks
        if any(True for _ in block.parameters()):
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr or 0.1)
    loss_fn = LOSS[data.task]
    first_step, epoch_times = None, []
    for epoch in range(1, spec.epochs + 1):
        t = time.perf_counter()
        for batch in batch_order(data.n_train, spec.batch_size, spec.seed, epoch):
            idx = batch.tensor_split(world)[rank]
            if first_step is None:
                first_step = time.time()
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_times.append(time.perf_counter() - t)
    if rank == 0:
        print(json.dumps({"epoch_times": epoch_times, "first_step": first_step,
                          "samples": data.n_train}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
