"""How a parameter server splits and ships the model: which server owns which tensors (`Part`,
balanced by size), the wire format of a part (one flat numpy array in `comm_dtype`), and the
optimizer state keyed by tensor name so that it does not depend on the split."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

# --- the wire: one flat numpy array per server, in comm_dtype ----------------------------------

@dataclass(frozen=True)
class Codec:
    encode: Callable[[torch.Tensor], np.ndarray]
    """flat fp32 tensor -> array to send."""
    decode: Callable[[np.ndarray], np.ndarray]
    """received array -> fp32 values (may be the received, read-only array itself)."""


def _bf16_encode(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _bf16_decode(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32)


CODECS: dict[str, Codec] = {
    "float32": Codec(lambda t: t.detach().numpy(), lambda a: a),
    "float16": Codec(lambda t: t.to(torch.float16).numpy(), lambda a: a.astype(np.float32)),
    "bfloat16": Codec(_bf16_encode, _bf16_decode),
}


# --- which server owns which tensors -----------------------------------------------------------

@dataclass(frozen=True)
class Part:
    """The tensors one server owns, in model order, and where each sits in the flat array."""
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def bounds(self) -> list[tuple[int, int]]:
        ends = np.cumsum([math.prod(s) for s in self.shapes]).tolist()
        return list(zip([0, *ends[:-1]], ends, strict=True))

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[a:b].view(s) for (a, b), s in zip(self.bounds, self.shapes, strict=True)]


def balance(sizes: Sequence[int], servers: int) -> list[list[int]]:
    """Tensor indices per server: largest tensor first onto the least-loaded server."""
    loads, owned = [0] * servers, [[] for _ in range(servers)]
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        s = loads.index(min(loads))
        owned[s].append(i)
        loads[s] += sizes[i]
    return [sorted(o) for o in owned]


def split_model(model: nn.Module, servers: int) -> list[Part]:
    named = list(model.named_parameters())
    return [Part(tuple(named[i][0] for i in idx), tuple(tuple(named[i][1].shape) for i in idx))
            for idx in balance([p.numel() for _, p in named], servers)]


def numpy_state(optimizer: torch.optim.Optimizer, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The optimizer's state keyed by tensor name, as numpy: independent of how tensors are split."""
    return {names[i]: {k: v.numpy().copy() if torch.is_tensor(v) else v for k, v in st.items()}
            for i, st in optimizer.state_dict()["state"].items()}


def to_file(state: dict[str, Any]) -> dict[str, Any]:
    """ps's state as a checkpoint holds it: its numpy arrays as tensors (raydist/engine/checkpoint.py
    reads nothing but plain data). torch.tensor copies: the arrays may be read-only ones."""
    return _convert(state, np.ndarray, torch.tensor)


def from_file(state: dict[str, Any]) -> dict[str, Any]:
    """to_file's inverse, exactly (same dtypes and values): the in-memory and wire format is numpy."""
    return _convert(state, torch.Tensor, torch.Tensor.numpy)


def _convert(value: Any, kind: type, to: Callable[[Any], Any]) -> Any:
    if isinstance(value, kind):
        return to(value)
    if isinstance(value, dict):
        return {k: _convert(v, kind, to) for k, v in value.items()}
    return value


def load_state(optimizer: torch.optim.Optimizer, names: Sequence[str], state: dict[str, Any]) -> None:
    sd = optimizer.state_dict()
    # torch.tensor copies: arrays from the object store are read-only and must not back the state
    sd["state"] = {i: {k: torch.tensor(v) if isinstance(v, np.ndarray) else v
                       for k, v in state[n].items()}
                   for i, n in enumerate(names) if n in state}
    optimizer.load_state_dict(sd)
