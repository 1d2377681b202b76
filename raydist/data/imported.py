"""A user's own data: `data: mypkg.data:load` names a function that raydist calls as
`load(**data_args)`. It returns either `(x, y)` (raydist holds out `val_fraction` of it for
validation, by `seed`) or a mapping with `x_train, y_train, x_val, y_val`; tensors or numpy
arrays, one row per sample.

- y of integers: classes 0..C-1 (task 'ce', out_dim C); y of floats: regression (task 'mse',
  out_dim = its columns; a 1-D y becomes one column).
- x of floats: features (N, F), or images (N, C, H, W), flattened to features with their
  image_shape kept; x of integers: token sequences (N, T), with y the (N, T) next tokens.
The same checks as CSV data: as many rows in x as in y, at least 2 samples, no NaN or infinity."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from raydist.data import FLOAT32_MAX, Dataset, split
from raydist.errors import ConfigError
from raydist.registry import check_arguments, import_object

if TYPE_CHECKING:  # annotations only: config sits above this layer and imports it
    from raydist.config import RunSpec

PARTS = ("x_train", "y_train", "x_val", "y_val")


def load_imported(spec: RunSpec) -> Dataset:
    loader = import_object(spec.data, "data")
    check_arguments(loader, spec.data_args, spec.data, "data_args")
    try:
        out = loader(**spec.data_args)
    except Exception as e:  # noqa: BLE001 - the user's loader: its own message, one line
        text = str(e).strip().splitlines()
        raise ConfigError(f"data: {spec.data} raised {type(e).__name__}: "
                          f"{text[0] if text else '(no message)'}") from None
    if isinstance(out, tuple | list) and len(out) == 2:
        x, y = (tensor(spec.data, name, v) for name, v in zip(("x", "y"), out, strict=True))
        check_pair(spec.data, "x", "y", x, y)
        return split(spec.data, flat(x), column(y), spec, **info(x, y, y))
    if isinstance(out, Mapping) and set(PARTS) <= set(out):
        t = {k: tensor(spec.data, k, out[k]) for k in PARTS}
        for part in ("train", "val"):
            check_pair(spec.data, f"x_{part}", f"y_{part}", t[f"x_{part}"], t[f"y_{part}"])
        if t["x_train"].shape[1:] != t["x_val"].shape[1:]:
            raise ConfigError(f"data: {spec.data} returned x_train of shape {tuple(t['x_train'].shape)} "
                              f"and x_val of shape {tuple(t['x_val'].shape)}; expected the same per sample")
        yt, yv = column(t["y_train"]), column(t["y_val"])
        return Dataset(spec.data, flat(t["x_train"]), yt, flat(t["x_val"]), yv, **info(t["x_train"], yt, yv))
    raise ConfigError(f"data: {spec.data} returned {type(out).__name__}; expected (x, y) or a mapping "
                      f"with {', '.join(PARTS)}")


def tensor(path: str, name: str, value: Any) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"data: {path} returned {name} as {type(value).__name__}; expected a tensor "
                          "or a numpy array")
    if value.dtype == torch.bool or value.is_complex():
        raise ConfigError(f"data: {path} returned {name} of dtype {value.dtype}; expected floats or integers")
    if value.is_floating_point():
        for bad, what in ((~torch.isfinite(value), "a NaN or infinite value"),
                          (value.double().abs() > FLOAT32_MAX, "a value too large for float32")):
            if value.dim() and bad.any():  # checked before the cast: float32 turns 1e39 into inf
                row = int(bad.reshape(len(value), -1).any(1).nonzero()[0])
                raise ConfigError(f"data: {path} returned {name} with {what} (row {row})")
        value = value.float()
    else:
        value = value.long()
    return value


def check_pair(path: str, xn: str, yn: str, x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() == 0 or y.dim() == 0 or len(x) == 0:
        raise ConfigError(f"data: {path} returned {xn} of shape {tuple(x.shape)} and {yn} of shape "
                          f"{tuple(y.shape)}; expected one row per sample, at least one")
    if len(x) != len(y):
        raise ConfigError(f"data: {path} returned {xn} with {len(x)} rows and {yn} with {len(y)}; "
                          "expected as many")
    if x.dtype == torch.int64 and (x.dim() != 2 or y.dtype != torch.int64 or y.shape != x.shape):
        raise ConfigError(f"data: {path} returned integer {xn} (token sequences) of shape "
                          f"{tuple(x.shape)} and {yn} of shape {tuple(y.shape)} ({y.dtype}); "
                          "expected (N, T) tokens and (N, T) integer next tokens")
    if x.is_floating_point() and x.dim() not in (2, 4):
        raise ConfigError(f"data: {path} returned {xn} of shape {tuple(x.shape)}; expected (N, features) "
                          "or images (N, C, H, W)")
    if not y.is_floating_point() and x.is_floating_point() and (y.dim() != 1 or y.min() < 0):
        raise ConfigError(f"data: {path} returned integer {yn} of shape {tuple(y.shape)}; classes "
                          "are expected as one label per sample, 0..C-1")


def is_regression(y: torch.Tensor) -> bool:
    return y.is_floating_point()


def column(y: torch.Tensor) -> torch.Tensor:
    return y.unsqueeze(1) if is_regression(y) and y.dim() == 1 else y


def flat(x: torch.Tensor) -> torch.Tensor:
    """Images as features (their shape goes into the Dataset)."""
    return x.reshape(len(x), -1) if x.dim() == 4 else x


def info(x: torch.Tensor, y_train: torch.Tensor, y_val: torch.Tensor) -> dict[str, Any]:
    """task, inputs, out_dim and image_shape, from the tensors' dtypes and shapes."""
    if x.dtype == torch.int64:
        vocab = int(max(x.max(), y_train.max(), y_val.max())) + 1
        return {"task": "ce", "inputs": "tokens", "out_dim": vocab}
    image = tuple(x.shape[1:]) if x.dim() == 4 else None
    inputs = "image" if image else "features"
    if is_regression(y_train):
        return {"task": "mse", "inputs": inputs, "out_dim": column(y_train).shape[1], "image_shape": image}
    return {"task": "ce", "inputs": inputs, "out_dim": int(max(y_train.max(), y_val.max())) + 1,
            "image_shape": image}
