"""Model registry. A registered model is an nn.Sequential of named blocks, so a pipeline can cut
it into contiguous stages; slicing an nn.Sequential keeps the block names, so parameter names
(`fc0.0.weight`, `block1.attn.qkv.weight`, ...) do not depend on how it is cut. A model can also
be a user's own: `model: mypkg.nets:make_model` names a factory (imported.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from raydist.data import Dataset
from raydist.errors import ConfigError
from raydist.registry import Registry

if TYPE_CHECKING:  # annotations only: config sits above this layer and imports it
    from raydist.config import RunSpec


@dataclass(frozen=True)
class ModelEntry:
    build: Callable[[RunSpec, Dataset], nn.Sequential]
    inputs: tuple[str, ...]
    """Dataset input kinds the model accepts."""
    knobs: tuple[str, ...] = ()
    """The RunSpec fields that size it (its flags); a built-in model takes no model_args."""


MODELS: Registry[ModelEntry] = Registry("model")


def knobs_of(name: str) -> tuple[str, ...]:
    """The knobs registered model `name` reads (RunSpec.refuse_unread names them)."""
    return MODELS[name].knobs


def build_model(spec: RunSpec, data: Dataset) -> nn.Module:
    """The model `spec.model` for `data`, its weights drawn from `spec.seed`."""
    if spec.model not in MODELS:
        from raydist.models.imported import build_imported

        torch.manual_seed(spec.seed)
        return build_imported(spec, data)
    entry = MODELS[spec.model]
    if data.inputs not in entry.inputs and not (data.inputs == "image" and "features" in entry.inputs):
        raise ConfigError(f"model: '{spec.model}' cannot take data '{spec.data}' "
                          f"({data.inputs}); it takes {' or '.join(entry.inputs)}")
    torch.manual_seed(spec.seed)
    return entry.build(spec, data)


from raydist.models import classic, gpt, resnet  # noqa: E402,F401  (each registers its models)
