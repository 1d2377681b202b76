"""A model as an order of blocks: an nn.Sequential (every registered model is one), or a module
with a method `pipeline_blocks(self) -> list[nn.Module]` whose blocks, applied in order, equal its
forward. The pipeline cuts the blocks into stages; fsdp shards each block on its own."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from raydist.errors import ConfigError

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


def units_of(model: nn.Module, name: str) -> list[nn.Module]:
    """The blocks a strategy treats one by one (fsdp's units; the blocks activation checkpointing
    recomputes and compile compiles): those with parameters, and none that shares one with
    another block (a head tied to the embedding: one parameter goes to one unit, the root's).
    A model without blocks has none: the root alone."""
    try:
        blocks = blocks_of(model, name)
    except ConfigError:
        return []
    shared = {i for pair in shared_parameters(blocks) for i in pair}
    return [b for i, b in enumerate(blocks.seq) if i not in shared and any(True for _ in b.parameters())]
