"""The peer of raydist's ddp: plain PyTorch DDP under torchrun (gloo), in the loop of
plain_loop.py (the same network, samples and order as raydist's side).

    python -m torch.distributed.run --nproc_per_node 2 bench/peers/torch_ddp.py --spec '{...}'
"""

from __future__ import annotations

import torch
from plain_loop import main  # torchrun runs this file with bench/peers first on sys.path
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    return DistributedDataParallel(model)


if __name__ == "__main__":
    main(wrap)
