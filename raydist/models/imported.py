"""A user's own model: `model: mypkg.nets:make_model` names a factory that raydist calls as
`make_model(data, **model_args)` in every process that needs the model (the driver, each ddp
worker, ps replica and pipeline stage), so the module must be importable there: on PYTHONPATH,
or in the working directory of `ray job submit --working-dir .`.

`data` is raydist's Dataset: `n_features` (columns of x), `out_dim` (classes, or targets of a
regression), `task` ('ce' classes, 'bce' one logit, 'mse' regression, or your loss's path),
`inputs` ('features', 'image', 'tokens'), `image_shape` ((C, H, W) for images), and the tensors
`x_train`, `y_train`, `x_val`, `y_val`. The factory returns any torch.nn.Module whose output
fits the loss: (N, out_dim) for 'ce' (N, T, out_dim for token sequences) and the targets' own
shape for 'bce' and 'mse'. The pre-flight checks all of that on two samples
(engine/preflight.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from raydist.data import Dataset
from raydist.errors import ConfigError
from raydist.registry import check_arguments, import_object

if TYPE_CHECKING:  # annotations only: config sits above this layer and imports it
    from raydist.config import RunSpec


def build_imported(spec: RunSpec, data: Dataset) -> nn.Module:
    factory = import_object(spec.model, "model")
    check_arguments(factory, spec.model_args, spec.model, "model_args", given=("data",))
    try:
        model = factory(data, **spec.model_args)
    except Exception as e:  # noqa: BLE001 - the user's factory: its own message, one line
        raise ConfigError(f"model: {spec.model} raised {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: {spec.model} returned {type(model).__name__}; expected a "
                          "torch.nn.Module")
    return model


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"
