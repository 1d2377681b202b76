"""`resnet`: ResNet-18 for 32x32x3 images, the CIFAR variant (a 3x3 stem conv and no max-pool,
as in He et al. 2016, section 4.2, and most CIFAR code since).

Blocks, the pipeline's cut points: `stem` (unflatten, 3x3 conv, BatchNorm, ReLU), `stage1` ..
`stage4` (two BasicBlocks each, widths c, 2c, 4c, 8c with c = `channels`; stages 2-4 halve the
resolution in their first block, whose shortcut is a 1x1 conv + BatchNorm), `head` (global
average pool, linear). Convolutions have no bias (a BatchNorm follows each), as in torchvision.
Parameters: 2724 c^2 + 257 c + 10 for 10 classes; channels 64 is the real ResNet-18's
11,173,962.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
from torch import nn

from raydist.data import Dataset
from raydist.errors import ConfigError
from raydist.models import MODELS, ModelEntry

if TYPE_CHECKING:  # annotations only: config sits above this layer and imports it
    from raydist.config import RunSpec

SHAPE = (3, 32, 32)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm, the input added back before the last ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def stage(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out))


def resnet(spec: RunSpec, data: Dataset) -> nn.Sequential:
    if tuple(data.image_shape or ()) != SHAPE:
        got = "x".join(map(str, data.image_shape)) if data.image_shape else "no image shape"
        raise ConfigError(f"data: '{spec.data}' has images of {got}; resnet takes 3x32x32 "
                          "images (data: images)")
    c = spec.channels
    model = nn.Sequential(OrderedDict(
        stem=nn.Sequential(nn.Unflatten(1, SHAPE), nn.Conv2d(3, c, 3, padding=1, bias=False),
                           nn.BatchNorm2d(c), nn.ReLU()),
        stage1=stage(c, c, 1),
        stage2=stage(c, 2 * c, 2),
        stage3=stage(2 * c, 4 * c, 2),
        stage4=stage(4 * c, 8 * c, 2),
        head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * c, data.out_dim)),
    ))
    for m in model.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


MODELS.register("resnet")(ModelEntry(resnet, inputs=("image",), knobs=("channels",)))
