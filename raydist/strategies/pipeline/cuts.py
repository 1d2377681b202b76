"""A model's blocks, where they are cut into pipeline stages, and what crosses each cut. No Ray:
`raydist plan` and calibration use the same blocks and cuts as the stages.

A pipeline needs the model as an order of blocks (raydist.models.blocks: an nn.Sequential, or a
module with `pipeline_blocks()`). The stages hold slices of `Blocks.seq`; `Blocks.model_state`
turns their state_dicts back into the model's own keys, so model.pt is the same as local's."""

from __future__ import annotations

import functools
import itertools
import math

import torch
from torch import nn

from raydist.config import RunSpec
from raydist.models.blocks import HOW, Blocks, blocks_of, shared_parameters  # noqa: F401  (the pipeline's names)
from raydist.strategies.pipeline.schedules import chunks_of

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
