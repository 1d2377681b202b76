"""BatchNorm over the global batch: ddp's `sync_batchnorm`, on any device and backend (gloo too).

DDP by default leaves BatchNorm alone, so each worker normalises its shard of the global batch
with that shard's own mean and variance, and a ddp run of a model with BatchNorm no longer
follows `local` (one process normalising the whole batch). torch.nn.SyncBatchNorm fixes that
on GPUs only: on CPU it raises. `GlobalBatchNorm` computes, per channel, the count, sum and sum
of squares of the rank's shard, all-reduces them in one autograd-aware collective (its backward
sums the statistics' gradients over the ranks, which is what the global batch's gradient needs),
and normalises with the global mean and biased variance; the running estimates move exactly as
nn.BatchNorm's do. The reductions run in float64, so E[x^2] - E[x]^2 loses nothing that matters
and the statistics match F.batch_norm over the whole batch in one process to float32 round-off.

It has nn.BatchNorm's parameter and buffer names (weight, bias, running_mean, running_var,
num_batches_tracked), so its state_dict loads into local's model and back. `convert` swaps it in
for every BatchNorm of a model, as torch.nn.SyncBatchNorm.convert_sync_batchnorm does.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.nn.functional import all_reduce
from torch.nn.modules.batchnorm import _BatchNorm

# torch 2.13 (pinned) marks torch.distributed.nn.functional.all_reduce deprecated in favour of the
# private _functional_collectives; it still works, and would warn in every worker's console.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
                        category=FutureWarning)

# The input ranks each BatchNorm class accepts (its _check_input_dim), kept across `convert`.
_DIMS: dict[type, tuple[int, ...]] = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}


class GlobalBatchNorm(_BatchNorm):
    """nn.BatchNorm whose training statistics are those of the global batch: every rank of the
    default process group. Eval mode, or a single process, is plain F.batch_norm."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 dims: tuple[int, ...] = (), device: torch.device | None = None,
                 dtype: torch.dtype | None = None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, bias=bias)
        self.dims = dims  # the input ranks allowed; () = any from 2 on

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2 or (self.dims and input.dim() not in self.dims):
            allowed = " or ".join(f"{d}D" for d in self.dims) or "at least 2D"
            raise ValueError(f"expected {allowed} input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        # nn.BatchNorm's bookkeeping, as in _BatchNorm.forward
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):  # eval, or one process: no communication
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                batch_stats, factor, self.eps)
        return self._global(input, running_mean, running_var, factor)

    def _global(self, x: torch.Tensor, running_mean: torch.Tensor | None,
                running_var: torch.Tensor | None, factor: float) -> torch.Tensor:
        c = x.shape[1]
        over = [d for d in range(x.dim()) if d != 1]  # every dimension but the channels
        x64 = x.to(torch.float64)
        count = torch.full((c,), x.numel() // c, dtype=torch.float64, device=x.device)
        # An empty shard contributes zeros, but it takes part: every rank calls the collective.
        stats = all_reduce(torch.stack([count, x64.sum(over), x64.square().sum(over)]))
        n, total, squares = stats[0, 0].item(), stats[1], stats[2]
        if n <= 1:  # nn.BatchNorm's refusal, now for the global batch (every rank sees it)
            raise ValueError(f"Expected more than 1 value per channel when training, got input "
                             f"size {n:.0f} over all ranks")
        mean = total / n
        var = (squares / n - mean.square()).clamp_min(0.0)  # biased: what normalises
        if running_mean is not None and running_var is not None:
            with torch.no_grad():  # as F.batch_norm: the unbiased variance for the estimate
                running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
                running_var.mul_(1 - factor).add_((var * (n / (n - 1))).to(running_var.dtype),
                                                  alpha=factor)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var + self.eps).to(x.dtype).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y


def convert(module: nn.Module) -> nn.Module:
    """Replace every nn.BatchNorm1d/2d/3d in `module` (and its subclasses, SyncBatchNorm's base
    included) by a GlobalBatchNorm holding the same parameters and buffers (the very tensors),
    in place; returns `module`, or the new layer if `module` itself is a BatchNorm. Call it
    before making the optimizer, which must hold the converted module's parameters."""
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        dims = next((d for cls, d in _DIMS.items() if isinstance(module, cls)), ())
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, dims=dims, bias=module.bias is not None)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        if hasattr(module, "qconfig"):
            new.qconfig = module.qconfig
        return new
    for name, child in module.named_children():
        module.add_module(name, convert(child))
    return module
