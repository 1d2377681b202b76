"""The article's six update rules, plus AdamW and LARS for large batches.

Every rule starts its accumulators at zero, as the article does. torch.optim is used where
its update is the same formula (tests/test_optim.py proves it against numpy):

- gd, sgd   w -= lr*g                                   torch SGD
- momentum  m = b*m + (1-b)*g;  w -= lr*m               own: torch's SGD starts m at g and
                                                        has no (1-b) factor
- adagrad   G += g*g;  w -= lr*g/(sqrt(G)+eps)          torch Adagrad (accumulator 0, no decay)
- rmsprop   R = b*R + (1-b)*g*g;  w -= lr*g/(sqrt(R)+eps)  torch RMSprop (alpha=b, centered off)
- adam      m, r EMAs with bias correction; eps outside the sqrt   torch Adam
- adamw     Adam with decoupled weight decay            torch AdamW
- lars      layer-wise trust ratio on momentum SGD      own (torch has none)
"""

from __future__ import annotations

import torch

from raydist.optim import OPTIMIZERS, OptimizerEntry, Params, PerTensor


class EMAMomentum(PerTensor):
    """The article's momentum: an exponential moving average of gradients, m starting at 0."""

    def __init__(self, params: Params, lr: float, beta: float = 0.9, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "beta": beta, "weight_decay": weight_decay})

    def update(self, p: torch.Tensor, group: dict, state: dict) -> None:
        g = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
        m = state.setdefault("m", torch.zeros_like(p))
        m.mul_(group["beta"]).add_(g, alpha=1 - group["beta"])
        p.add_(m, alpha=-group["lr"])


class LARS(PerTensor):
    """Momentum SGD whose step per tensor is scaled by trust * ||w|| / ||g + wd*w|| (You et al.)."""

    def __init__(self, params: Params, lr: float, beta: float = 0.9, weight_decay: float = 0.0,
                 trust: float = 0.001):
        super().__init__(params, {"lr": lr, "beta": beta, "weight_decay": weight_decay,
                                  "trust": trust})

    def update(self, p: torch.Tensor, group: dict, state: dict) -> None:
        g = p.grad.add(p, alpha=group["weight_decay"])
        w_norm, g_norm = p.norm(), g.norm()
        ratio = group["trust"] * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
        m = state.setdefault("m", torch.zeros_like(p))
        m.mul_(group["beta"]).add_(g, alpha=ratio * group["lr"])
        p.sub_(m)


def _sgd(params: Params, lr: float, weight_decay: float = 0.0, **_: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


def _momentum(params: Params, lr: float, beta: float = 0.9, weight_decay: float = 0.0,
              **_: float) -> torch.optim.Optimizer:
    return EMAMomentum(params, lr=lr, beta=beta, weight_decay=weight_decay)


def _adagrad(params: Params, lr: float, eps: float = 1e-8, weight_decay: float = 0.0,
             **_: float) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(params, lr=lr, eps=eps, weight_decay=weight_decay,
                               initial_accumulator_value=0.0, lr_decay=0.0)


def _rmsprop(params: Params, lr: float, beta: float = 0.9, eps: float = 1e-8,
             weight_decay: float = 0.0, **_: float) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=lr, alpha=beta, eps=eps, weight_decay=weight_decay,
                               momentum=0.0, centered=False)


def _adam(params: Params, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.0, **_: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=(beta1, beta2), eps=eps,
                            weight_decay=weight_decay)


def _adamw(params: Params, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
           weight_decay: float = 0.0, **_: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), eps=eps,
                             weight_decay=weight_decay)


def _lars(params: Params, lr: float, beta: float = 0.9, weight_decay: float = 0.0,
          **_: float) -> torch.optim.Optimizer:
    return LARS(params, lr=lr, beta=beta, weight_decay=weight_decay)


# state: the tensors each keeps per parameter (SGD with momentum 0 keeps none)
OPTIMIZERS.register("gd")(OptimizerEntry(_sgd, default_lr=0.5, full_batch=True, state=0.0))
OPTIMIZERS.register("sgd")(OptimizerEntry(_sgd, default_lr=0.1, state=0.0))
OPTIMIZERS.register("momentum")(OptimizerEntry(_momentum, default_lr=0.1, state=1.0))  # m
OPTIMIZERS.register("adagrad")(OptimizerEntry(_adagrad, default_lr=0.05, state=1.0))  # G
OPTIMIZERS.register("rmsprop")(OptimizerEntry(_rmsprop, default_lr=0.003, state=1.0))  # R
OPTIMIZERS.register("adam")(OptimizerEntry(_adam, default_lr=0.01, state=2.0))  # m, r
OPTIMIZERS.register("adamw")(OptimizerEntry(_adamw, default_lr=0.01, state=2.0))  # m, r
OPTIMIZERS.register("lars")(OptimizerEntry(_lars, default_lr=1.0, state=1.0))  # m
