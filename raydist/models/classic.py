"""The first built-in models: `mlp`, `cnn` and a small character-level `transformer`."""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from raydist.data import Dataset
from raydist.errors import ConfigError
from raydist.models import MODELS, ModelEntry

if TYPE_CHECKING:  # annotations only: config sits above this layer and imports it
    from raydist.config import RunSpec


def mlp(spec: RunSpec, data: Dataset) -> nn.Sequential:
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    width = data.n_features
    for i, h in enumerate(spec.hidden):
        blocks[f"fc{i}"] = nn.Sequential(nn.Linear(width, h), nn.ReLU())
        width = h
    blocks["head"] = nn.Linear(width, data.out_dim)
    return nn.Sequential(blocks)


def cnn(spec: RunSpec, data: Dataset) -> nn.Sequential:
    c, h, w = data.image_shape
    k = spec.channels
    return nn.Sequential(OrderedDict(
        conv0=nn.Sequential(nn.Unflatten(1, (c, h, w)), nn.Conv2d(c, k, 3, padding=1), nn.ReLU()),
        conv1=nn.Sequential(nn.Conv2d(k, 2 * k, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        head=nn.Sequential(nn.Flatten(), nn.Linear(2 * k * (h // 2) * (w // 2), data.out_dim)),
    ))


class Embed(nn.Module):
    def __init__(self, vocab: int, d: int, seq_len: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq_len, d) * 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok(idx) + self.pos[: idx.shape[1]]


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The head count follows from the width qkv gives (heads x head_dim each of q, k, v), not
        # from self.heads: a qkv split over tensor-parallel ranks gives each its own heads only.
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, -1, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    """Pre-norm transformer block, as in nanoGPT."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def transformer(spec: RunSpec, data: Dataset) -> nn.Sequential:
    if spec.d_model % spec.heads:
        raise ConfigError(f"heads: {spec.heads} does not divide d_model {spec.d_model}")
    blocks: OrderedDict[str, nn.Module] = OrderedDict(
        embed=Embed(data.out_dim, spec.d_model, spec.seq_len))
    for i in range(spec.layers):
        blocks[f"block{i}"] = Block(spec.d_model, spec.heads)
    blocks["head"] = nn.Sequential(nn.LayerNorm(spec.d_model), nn.Linear(spec.d_model, data.out_dim))
    return nn.Sequential(blocks)


MODELS.register("mlp")(ModelEntry(mlp, inputs=("features",), knobs=("hidden",)))
MODELS.register("cnn")(ModelEntry(cnn, inputs=("image",), knobs=("channels",)))
MODELS.register("transformer")(ModelEntry(transformer, inputs=("tokens",),
                                          knobs=("layers", "d_model", "heads", "seq_len")))
