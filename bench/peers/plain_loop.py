"""The loop both torchrun peers run (torch_ddp.py, torch_fsdp.py): plain PyTorch, nothing of
raydist's but the model and data builders, so both sides train the same network on the same
samples in the same order. Rank 0 prints one JSON line: epoch times and when the first step
began. --backend nccl puts rank r on GPU r."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from raydist.config import RunSpec
from raydist.data import batch_order, load_data
from raydist.models import build_model

LOSS = {"bce": F.binary_cross_entropy_with_logits, "ce": F.cross_entropy, "mse": F.mse_loss}


def main(wrap: Callable[[nn.Module, torch.device], nn.Module]) -> None:
    """Train spec.epochs of plain SGD on `wrap(model, device)` (DDP, FSDP2) in this rank."""
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
    model = wrap(build_model(spec, data).to(device), device)
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
