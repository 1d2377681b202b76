"""A model's blocks, where they are cut into pipeline stages, and what crosses each cut. No Ray:
`raydist plan` and calibration use the same blocks and cuts as the stages.

A pipeline needs the model as an order of blocks: an nn.Sequential (every registered model is
one), or a module with a method `pipeline_blocks(self) -> list[nn.Module]` whose blocks, applied
in order, equal its forward. The stages hold slices of `Blocks.seq`; `Blocks.model_state` turns
their state_dicts back into the model's own keys, so model.pt is the same as local's."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any

import torch
from torch import nn

from raydist.config import ConfigError, RunSpec
from raydist.strategies.pipeline.schedules import chunks_of

HOW = ("return an nn.Sequential of its blocks, or give the module a method pipeline_blocks(self) "
       "-> list[nn.Module] whose blocks, applied in order, equal its forward")


@dataclasses.dataclass
class Blocks:
    seq: nn.Sequential
    """the blocks in order; the model itself when it is an nn.Sequential"""
    prefixes: list[str] | None = None
    """each block's name in the model (None: seq is the model, its keys are the model's)"""

    def __len__(self) -> int:
        return len(self.seq)

    def model_state(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """The stages' state_dicts (slices of seq) as one state_dict with the model's keys."""
        return {self.model_key(k): v for st in states for k, v in st.items()}

    def model_key(self, key: str) -> str:
        """A key of seq (or of a slice of it) as the model names it."""
        if self.prefixes is None:
            return key
        index, _, rest = key.partition(".")
        return f"{self.prefixes[int(index)]}.{rest}"


def blocks_of(model: nn.Module, name: str) -> Blocks:
    """The model's blocks (ConfigError naming `model` when it has none a pipeline can use)."""
    if isinstance(model, nn.Sequential):
        return Blocks(model)
    if not callable(getattr(model, "pipeline_blocks", None)):
        raise ConfigError(f"model: a pipeline cuts the model into blocks, and {name} gives none: {HOW}")
    blocks = list(model.pipeline_blocks())
    names = {id(m): n for n, m in model.named_modules() if n}
    if not blocks or not all(isinstance(b, nn.Module) and id(b) in names for b in blocks):
        raise ConfigError(f"model: {name}'s pipeline_blocks() must return a non-empty list of the "
                          "model's own submodules")
    seq = nn.Sequential(*blocks)
    prefixes = [names[id(b)] for b in blocks]
    missing = sorted(set(model.state_dict()) - set(Blocks(seq, prefixes).model_state([seq.state_dict()])))
    if missing:
        raise ConfigError(f"model: {name}'s pipeline_blocks() leave out {', '.join(missing[:3])}; "
                          "every parameter and buffer must be in one of the blocks")
    return Blocks(seq, prefixes)


def shared_parameters(blocks: Blocks) -> list[tuple[int, int]]:
    """Pairs of blocks (indices) that hold the same parameter, e.g. a head tied to the embedding:
    on different stages they would drift apart."""
    owner: dict[int, int] = {}
    pairs = []
    for i, block in enumerate(blocks.seq):
        for p in block.parameters():
            if id(p) in owner and owner[id(p)] != i:
                pairs.append((owner[id(p)], i))
            owner.setdefault(id(p), i)
    return sorted(set(pairs))

# --- where the model is cut ---------------------------------------------------------------------

def block_sizes(model: nn.Sequential) -> list[int]:
    return [sum(p.numel() for p in block.parameters()) for block in model]


def balanced_cuts(sizes: list[int], stages: int) -> list[int]:
    """Block indices where stages 2..K start: the largest stage as small as possible, then the
    stages as even as possible (least sum of squared sizes; ties: the earliest cuts)."""
    prefix = [0, *itertools.accumulate(sizes)]
    n = len(sizes)

    def size(start: int, end: int) -> int:
        return prefix[end] - prefix[start]

    def cuts_after(start: int, parts: int) -> range:
        return range(start + 1, n - parts + 2)

    @functools.cache
    def largest(start: int, parts: int) -> int:
        """The smallest possible largest stage of blocks start..n-1 in `parts` stages."""
        if parts == 1:
            return size(start, n)
        return min(max(size(start, c), largest(c, parts - 1)) for c in cuts_after(start, parts))

    limit = largest(0, stages)

    @functools.cache
    def even(start: int, parts: int) -> tuple[float, tuple[int, ...]]:
        """(sum of squared sizes, cuts) of blocks start..n-1 in `parts` stages within the limit."""
        if parts == 1:
            return (size(start, n) ** 2 if size(start, n) <= limit else math.inf), ()
        options = []
        for c in cuts_after(start, parts):
            if size(start, c) <= limit:
                rest, cuts = even(c, parts - 1)
                options.append((size(start, c) ** 2 + rest, (c, *cuts)))
        return min(options, default=(math.inf, ()))

    return list(even(0, stages)[1])


def pieces(spec: RunSpec) -> int:
    """The chunks the model is cut into: K stages x V chunks per stage (V = 1 but interleaved)."""
    return spec.stages * chunks_of(spec.schedule, spec.virtual_stages)


def stage_bounds(spec: RunSpec, model: nn.Sequential) -> list[int]:
    """[0, cut_1, ..., blocks]: chunk j (virtual stage j; stage j when V = 1) holds blocks
    bounds[j]:bounds[j+1]; chunk j runs on stage actor j mod K."""
    cuts = spec.cuts if spec.cuts is not None else balanced_cuts(block_sizes(model), pieces(spec))
    return [0, *cuts, len(model)]


Shape = tuple[tuple[int, ...], torch.dtype]
"""A tensor's shape past the batch dimension, and its dtype: what a stage receives."""


def boundary_shapes(model: nn.Sequential, x: torch.Tensor, bounds: list[int]) -> list[Shape]:
    """The shape and dtype of what enters each stage, from one sample run through the model: a
    receiver must size its buffer before the data arrive."""
    shapes: list[Shape] = []
    with torch.no_grad():
        for k in range(len(bounds) - 1):
            shapes.append((tuple(x.shape[1:]), x.dtype))
            x = model[bounds[k] : bounds[k + 1]](x)
    return shapes
