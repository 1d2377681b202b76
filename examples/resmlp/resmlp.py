"""A user's own model and data, as raydist runs them: a residual MLP that is not an
nn.Sequential (it says how a pipeline cuts it, `pipeline_blocks`), and a data loader.

    PYTHONPATH=examples/resmlp raydist train --config examples/resmlp/train.yaml
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.fc(self.norm(x)))


class ResidualMLP(nn.Module):
    def __init__(self, n_features: int, out_dim: int, width: int, depth: int) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(n_features, width), nn.ReLU())
        self.blocks = nn.ModuleList(Residual(width) for _ in range(depth))
        self.out = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)

    def pipeline_blocks(self) -> list[nn.Module]:
        """The blocks in the order forward applies them: where pipeline stages may be cut."""
        return [self.inp, *self.blocks, self.out]


def make_model(data, width: int = 64, depth: int = 2) -> nn.Module:
    """raydist calls this as make_model(data, **model_args) in every process that trains."""
    return ResidualMLP(data.n_features, data.out_dim, width, depth)


def load(n: int = 1200, features: int = 16, classes: int = 4, seed: int = 0):
    """(x, y): `classes` Gaussian clusters in `features` dimensions, integer labels (so raydist
    trains a classifier). raydist holds out val_fraction of it by its own seed."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 0.9, size=(classes, features))
    y = rng.integers(0, classes, size=n)
    x = centres[y] + rng.normal(0, 1.5, size=(n, features))
    return x.astype(np.float32), y
