"""`images`: a synthetic, CIFAR-shaped data set (10 classes of 3x32x32 images) that a network
can learn, without a download.

Each class is a fixed random smooth pattern: per channel, a sum of a few 2-D sinusoids and
Gaussian blobs. An image is its class's pattern moved by a random shift of up to `SHIFT` pixels
(the pattern is evaluated at shifted coordinates, so there is no wrap-around seam), times a
random contrast, plus pixel noise. Values are standardised per channel over the whole set.

The set is fixed: patterns, labels, shifts and noise come from generators seeded with
constants, so every call gives the same tensors whatever `spec.seed`; only the train/val split
follows the seed (as `synthetic` does). `spec.samples` sets its size.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from raydist.data import DATASETS, Dataset, split

if TYPE_CHECKING:  # annotations only: config sits above this layer and imports it
    from raydist.config import RunSpec

CLASSES = 10
SHAPE = (3, 32, 32)
WAVES = 3
"""sinusoids per class and channel"""
BLOBS = 2
"""Gaussian blobs per class and channel"""
SHIFT = 4
"""largest shift, in pixels, along each axis"""
NOISE = 1.0
"""pixel noise's std, relative to the patterns' std"""
LOW, HIGH = 3.0, 8.0
"""the waves' spatial frequencies, in cycles per image: wavelengths of 4 to 11 pixels"""
CHUNK = 1024
"""images rendered at a time (bounds the memory of a large `samples`)"""


def _frequencies(r: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """(..., 2) angular frequencies (rows, cols) of LOW + r * (HIGH - LOW) cycles per image in
    direction 2 pi * angle."""
    k = (LOW + r * (HIGH - LOW)) * 2 * math.pi / SHAPE[1]
    return torch.stack((k * torch.cos(2 * math.pi * angle), k * torch.sin(2 * math.pi * angle)), -1)


def _patterns(g: torch.Generator) -> dict[str, torch.Tensor]:
    """Each class's and channel's waves (frequency, phase, amplitude) and blobs (centre, width,
    sign)."""
    n = (CLASSES, SHAPE[0])
    return {
        # spatial frequencies of LOW to HIGH cycles per image, in any direction
        "freq": _frequencies(torch.rand(*n, WAVES, generator=g), torch.rand(*n, WAVES, generator=g)),
        "phase": torch.rand(*n, WAVES, generator=g) * 2 * math.pi,
        "amp": 0.5 + torch.rand(*n, WAVES, generator=g),
        "centre": 6 + torch.rand(*n, BLOBS, 2, generator=g) * (SHAPE[1] - 12),
        "width": 3 + torch.rand(*n, BLOBS, generator=g) * 4,
        "sign": torch.randint(0, 2, (*n, BLOBS), generator=g).float() * 1.2 - 0.6,
    }


def _render(p: dict[str, torch.Tensor], y: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(N, 3, 32, 32): class y's pattern, evaluated at coordinates moved by `shift` (N, 2)."""
    h, w = SHAPE[1:]
    rows = torch.arange(h, dtype=torch.float32).view(1, 1, 1, h, 1) - shift[:, 0].view(-1, 1, 1, 1, 1)
    cols = torch.arange(w, dtype=torch.float32).view(1, 1, 1, 1, w) - shift[:, 1].view(-1, 1, 1, 1, 1)
    freq = p["freq"][y]  # (N, C, WAVES, 2)
    arg = (freq[..., 0, None, None] * rows + freq[..., 1, None, None] * cols
           + p["phase"][y][..., None, None])
    waves = (p["amp"][y][..., None, None] * torch.sin(arg)).sum(2)
    centre = p["centre"][y]  # (N, C, BLOBS, 2)
    d2 = (rows - centre[..., 0, None, None]) ** 2 + (cols - centre[..., 1, None, None]) ** 2
    blobs = (p["sign"][y][..., None, None]
             * torch.exp(-d2 / (2 * p["width"][y][..., None, None] ** 2))).sum(2)
    return waves + blobs


def make_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images, flattened to (n, 3*32*32) float32 and standardised, with their labels (n,):
    the same tensors on every call."""
    patterns = _patterns(torch.Generator().manual_seed(3232))
    g = torch.Generator().manual_seed(1032)
    y = (torch.arange(n) % CLASSES)[torch.randperm(n, generator=g)]  # balanced classes
    shift = torch.randint(-SHIFT, SHIFT + 1, (n, 2), generator=g).float()
    contrast = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
    x = torch.cat([_render(patterns, y[i : i + CHUNK], shift[i : i + CHUNK])
                   for i in range(0, n, CHUNK)]) * contrast
    x = x + NOISE * x.std() * torch.randn(x.shape, generator=g)
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    return x.reshape(n, -1).contiguous(), y


@DATASETS.register("images")
def images(spec: RunSpec, _: str) -> Dataset:
    """`spec.samples` synthetic 3x32x32 images of 10 classes (see the module's docstring)."""
    x, y = make_images(spec.samples)
    return split("images", x, y, spec, task="ce", inputs="image", out_dim=CLASSES,
                 image_shape=SHAPE)
