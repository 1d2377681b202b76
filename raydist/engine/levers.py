"""The training loop's levers, written once for every strategy whose step is the engine's
(local, ddp, fsdp, tp: RunSpec's LEVERS): gradient accumulation, clipping by the global norm,
bf16 mixed precision, activation checkpointing and compilation of each block.

- `grad_accum_steps` k: engine.step cuts a worker's share of a global batch into k contiguous
  micro-batches, each backward adding into .grad with the loss denominator of the whole global
  batch, so the k gradients sum to the one k = 1 computes (float32 round-off apart). The model's
  gradient exchange waits for the last micro-step (`sync_held`: DDP's no_sync, FSDP2's
  set_requires_gradient_sync(False)). A layer whose output depends on the other samples of its
  batch (BatchNorm) sees micro-batches instead, as in every framework.
- `clip_grad_norm`: after the exchange, the global 2-norm of the whole model's gradient (every
  rank computes the same: ddp's replicas hold the averaged gradient, fsdp's and tp's DTensor
  norms are reduced over their mesh) scales every gradient by min(1, max_norm / (norm + 1e-6)),
  torch.nn.utils.clip_grad_norm_'s formula. The pre-clip norm is measured at every step, clip or
  not: the record's grad_norm and grad_norm_max.
- `precision` bf16-mixed: the forward and the loss under torch.autocast in bfloat16 (training
  and evaluation); parameters, gradients and optimizer state stay float32.
- `activation_checkpointing` blocks and `compile`: applied to the model's blocks
  (raydist.models.blocks.units_of, fsdp's units) in place, before any strategy wraps or shards
  them (torchtitan's order), keeping the model's module tree and state_dict keys.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from raydist.config import RunSpec
from raydist.models.blocks import units_of

Reduce = Callable[[], None]


@dataclass
class Levers:
    """What a run's step does besides forward, backward and the optimizer's step; `norms`: the
    pre-clip gradient norm of each step since the last `take`."""

    accum: int = 1
    max_norm: float | None = None
    bf16: bool = False
    reduce: Reduce | None = None
    """what makes each gradient the data-parallel replicas' mean, where the backward does not
    (tp's groups): before the norm"""
    norms: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, spec: RunSpec) -> Levers:
        return cls(spec.grad_accum_steps, spec.clip_grad_norm, spec.precision == "bf16-mixed")

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """The forward's precision (CPU and CUDA autocast alike)."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def clip(self, params: Iterable[torch.Tensor]) -> None:
        """Measure the global gradient norm, and clip to max_norm if set."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:  # a model without trainable parameters: nothing to measure
            return
        norm = global_norm(grads)
        self.norms.append(norm.item())
        if self.max_norm is not None:
            coef = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)  # clip_grad_norm_'s own
            torch._foreach_mul_([local(g) for g in grads], coef)  # a DTensor: its shard scales

    def take(self) -> dict[str, float]:
        """The record's grad_norm (mean over the steps since the last call) and grad_norm_max."""
        norms, self.norms = self.norms, []
        if not norms:
            return {}
        return {"grad_norm": sum(norms) / len(norms), "grad_norm_max": max(norms)}


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t` (the tensor itself if it is not a DTensor), sharing its storage."""
    return t.to_local() if hasattr(t, "to_local") else t


def global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all `grads` together, a plain float32 scalar on every rank. Plain tensors go
    through torch.nn.utils.get_total_norm (what clip_grad_norm_ uses); DTensors, grouped by mesh
    and placements (torch stacks norms of one layout only), through the same function, whose
    DTensor result .full_tensor() reduces over the mesh."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        key = (g.device_mesh, tuple(g.placements)) if hasattr(g, "placements") else None
        groups.setdefault(key, []).append(g)
    parts = []
    for key, members in groups.items():
        norm = torch.nn.utils.get_total_norm(members)
        parts.append(norm.full_tensor() if key is not None else norm)
    if len(parts) == 1:
        return parts[0]
    return torch.linalg.vector_norm(torch.stack([p.to(parts[0].device) for p in parts]))


@contextlib.contextmanager
def sync_held(model: nn.Module) -> Iterator[None]:
    """The model's gradient exchange held back for a micro-step that is not the last: DDP's
    no_sync, FSDP2's set_requires_gradient_sync(False); nothing for a plain or tp model, whose
    backward exchanges nothing across data-parallel replicas."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def apply(model: nn.Module, spec: RunSpec) -> nn.Module:
    """Activation checkpointing and compilation of each block of `model`, in place: the block's
    forward replaced by one bound to it (so the module tree, its names and state_dict keys stay
    local's; a deepcopy binds its copy). torch.compile of that forward, not nn.Module.compile:
    dynamo here skips the compiled Module._call_impl and runs it eager (measured: no frame)."""
    if spec.activation_checkpointing == "none" and not spec.compile:
        return model
    forward = _recomputed if spec.activation_checkpointing == "blocks" else _plain
    for i, block in enumerate(units_of(model, spec.model)):
        own = torch.compile(_copy(forward, i)) if spec.compile else forward
        block.forward = types.MethodType(own, block)
    return model


def _copy(fn: Callable[..., Any], i: int) -> Callable[..., Any]:
    """`fn` with a code object of its own for block i: dynamo keeps compiled graphs per code
    object and runs one eager past its recompile limit (8), which blocks sharing one would reach."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_block{i}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _plain(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The block's own forward (what compile compiles without checkpointing)."""
    return type(self).forward(self, *args, **kwargs)


def _recomputed(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A block's forward that keeps only its inputs for the backward and runs again there
    (non-reentrant checkpoint, RNG state restored: dropout draws the same masks); under no_grad
    (evaluation) a plain forward."""
    forward = type(self).forward
    if not torch.is_grad_enabled():
        return forward(self, *args, **kwargs)
    return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
