"""The peer of raydist's fsdp: plain PyTorch FSDP2 under torchrun (gloo), fully_shard on each of
the model's top-level blocks and then on the root (as raydist's fsdp/parallelize.py does), in
the loop of plain_loop.py (the same network, samples and order as raydist's side).

    python -m torch.distributed.run --nproc_per_node 2 bench/peers/torch_fsdp.py --spec '{...}'
"""

from __future__ import annotations

import torch
from plain_loop import main  # torchrun runs this file with bench/peers first on sys.path
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for block in model:  # every registered model is an nn.Sequential of blocks
        if any(True for _ in block.parameters()):
            fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


if __name__ == "__main__":
    main(wrap)
