"""Five newer update rules (formulas: docs/design.md, "Optimizers"; checked against numpy in
tests/test_optim.py):

- muon                 Muon on hidden matrices, AdamW on the rest     torch Muon (its Newton-Schulz
                                                                      in float32) + torch AdamW
- lamb                 Adam's step scaled per tensor by ||w||/||step||  own (torch has none)
- adafactor            factored second moments, relative step size   torch Adafactor
- lion                 w -= lr*sign(b1*m + (1-b1)*g); m EMA of g       own (torch has none)
- schedule-free-adamw  AdamW without a schedule: gradients at y, the   schedulefree package
                       evaluated weights x an average of the steps z
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import schedulefree
import torch

from raydist.optim import OPTIMIZERS, OptimizerEntry, Params, PerTensor

# --- muon ----------------------------------------------------------------------------------------

def hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """Muon's share: a 2-D tensor that is neither an embedding nor the output head (AdamW's, as
    Muon's authors prescribe), told by its name in the model: no component of it starts with
    `embed` or is `head` or ends in `_head` (`lm_head`). Decided per tensor, so a ps shard or a
    pipeline stage splits its tensors as local splits the whole model. Without a name the shape
    decides alone. Convolutions (4-D), biases and norms go to AdamW."""
    return p.ndim == 2 and not any(s.startswith("embed") or s == "head" or s.endswith("_head")
                                   for s in name.split("."))


def newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> torch.Tensor:
    """torch.optim.Muon's quintic iteration towards the orthogonal factor of g, in g's dtype."""
    a, b, c = coefficients
    tall = g.size(0) > g.size(1)
    x = g.T if tall else g
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon (its defaults, checks and state), stepping with Moonshot's learning rate
    (0.2*sqrt(max(rows, cols))*lr, torch's `match_rms_adamw`: one lr serves Muon and AdamW), its
    Newton-Schulz iteration in the parameters' dtype. torch's runs in bfloat16: float32 round-off
    (ddp's all-reduce order, ps's sums, pipeline's micro-batches) then flips bfloat16 roundings;
    mlp on digits stepped on a 2-way gradient sum ended 5e-2 from the whole batch's after 3
    epochs (float32: 1.6e-6)."""

    def __init__(self, params: Params, lr: float, momentum: float, weight_decay: float) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True,
                         adjust_lr_fn="match_rms_adamw")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._init_group(group, params, grads, bufs)
            mu, lr = group["momentum"], group["lr"]
            for p, g, buf in zip(params, grads, bufs, strict=True):
                buf.lerp_(g, 1 - mu)
                o = newton_schulz(g.lerp(buf, mu), group["ns_coefficients"], group["ns_steps"], group["eps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(o, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))
        return loss


class MuonAdamW(torch.optim.Optimizer):
    """Muon over the hidden matrices and AdamW over every other tensor, as one optimizer: its
    param groups are runs of consecutive tensors of one kind (flag `muon`), each shared with the
    Muon or AdamW that steps it, so the state's indices follow the parameters' order (ps keys a
    shard's state by position) and schedulers see every group."""

    def __init__(self, named: Iterable[tuple[str, torch.Tensor]], lr: float, momentum: float,
                 betas: tuple[float, float], eps: float, weight_decay: float) -> None:
        runs = itertools.groupby(named, key=lambda item: hidden_matrix(*item))
        super().__init__([{"params": [p for _, p in run], "muon": muon} for muon, run in runs], {"lr": lr})
        makers: dict[bool, Callable[[list[dict[str, Any]]], torch.optim.Optimizer]] = {
            True: lambda groups: Muon(groups, lr=lr, momentum=momentum, weight_decay=weight_decay),
            False: lambda groups: torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps,
                                                    weight_decay=weight_decay)}
        self.parts = {muon: make(self.groups(muon)) for muon, make in makers.items() if self.groups(muon)}
        self.link()
        self.register_load_state_dict_post_hook(MuonAdamW.link)

    def groups(self, muon: bool) -> list[dict[str, Any]]:
        return [g for g in self.param_groups if g["muon"] == muon]

    def link(self) -> None:
        """Muon and AdamW step the groups and the state this optimizer holds (load_state_dict
        replaces both)."""
        for muon, part in self.parts.items():
            part.param_groups, part.state = self.groups(muon), self.state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure() if closure is not None else None
        for part in self.parts.values():
            part.step()
        return loss


# --- lamb, lion ------------------------------------------------------------------------------------

class LAMB(PerTensor):
    """Adam's bias-corrected step plus decoupled decay, scaled per tensor by ||w|| / ||step||
    (You et al. 2019, Algorithm 2, with phi the identity)."""

    def __init__(self, params: Params, lr: float, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-6, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": (beta1, beta2), "eps": eps,
                                  "weight_decay": weight_decay})

    def update(self, p: torch.Tensor, group: dict, state: dict) -> None:
        b1, b2 = group["betas"]
        t = state["step"] = state.get("step", 0) + 1
        m = state.setdefault("m", torch.zeros_like(p)).mul_(b1).add_(p.grad, alpha=1 - b1)
        v = state.setdefault("v", torch.zeros_like(p)).mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        u = (m / (1 - b1**t)).div_((v / (1 - b2**t)).sqrt_().add_(group["eps"]))
        u.add_(p, alpha=group["weight_decay"])
        w_norm, u_norm = p.norm().item(), u.norm().item()
        ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
        p.sub_(u, alpha=group["lr"] * ratio)


class Lion(PerTensor):
    """Chen et al. 2023: the sign of an interpolation of momentum and gradient, decoupled decay;
    the momentum is updated after the step, with its own beta2."""

    def __init__(self, params: Params, lr: float, beta1: float = 0.9, beta2: float = 0.99,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": (beta1, beta2), "weight_decay": weight_decay})

    def update(self, p: torch.Tensor, group: dict, state: dict) -> None:
        b1, b2 = group["betas"]
        m = state.setdefault("m", torch.zeros_like(p))
        update = m.mul(b1).add_(p.grad, alpha=1 - b1).sign_()
        p.mul_(1 - group["lr"] * group["weight_decay"]).sub_(update, alpha=group["lr"])
        m.mul_(b2).add_(p.grad, alpha=1 - b2)


# --- schedule-free AdamW ---------------------------------------------------------------------------

GROUP_STATE = ("k", "weight_sum", "lr_max", "train_mode")
"""schedulefree's per-group counters and mode, copied into every tensor's state by state_dict and
read back by load_state_dict: a ps server checkpoints only the per-tensor state (ps/sharding.py)."""


def _mirror_group_state(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    for group in sd["param_groups"]:
        for i in group["params"]:
            if i in sd["state"]:  # a copy: state_dict's entries are the live state's own dicts
                sd["state"][i] = {**sd["state"][i], **{k: group[k] for k in GROUP_STATE}}


def _read_group_state(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
    groups = []
    for group in sd["param_groups"]:
        kept = [sd["state"][i] for i in group["params"] if GROUP_STATE[0] in sd["state"].get(i, {})]
        groups.append({**group, **{k: kept[0][k] for k in GROUP_STATE}} if kept else group)
    return {**sd, "param_groups": groups}


class ScheduleFreeAdamW(schedulefree.AdamWScheduleFree):
    """schedulefree's AdamW (Defazio et al. 2024) whose group counters travel in each tensor's
    state too (GROUP_STATE). It starts in eval mode, where the parameters hold x."""

    def __init__(self, params: Params, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float) -> None:
        super().__init__(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
        self.register_state_dict_post_hook(_mirror_group_state)
        self.register_load_state_dict_pre_hook(_read_group_state)


# --- builders ------------------------------------------------------------------------------------

def _muon(named: Iterable[tuple[str, torch.Tensor]], lr: float, beta: float = 0.9, beta1: float = 0.9,
          beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
          **_: float) -> torch.optim.Optimizer:
    return MuonAdamW(named, lr=lr, momentum=beta, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)


def _lamb(params: Params, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.0, **_: float) -> torch.optim.Optimizer:
    return LAMB(params, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)


def _adafactor(params: Params, lr: float, weight_decay: float = 0.0, **_: float) -> torch.optim.Optimizer:
    return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)


def _lion(params: Params, lr: float, beta1: float = 0.9, beta2: float = 0.999, weight_decay: float = 0.0,
          **_: float) -> torch.optim.Optimizer:
    return Lion(params, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)


def _schedule_free(params: Params, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.0, **_: float) -> torch.optim.Optimizer:
    return ScheduleFreeAdamW(params, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)


def _train(optimizer: torch.optim.Optimizer) -> None:
    optimizer.train()


def _eval(optimizer: torch.optim.Optimizer) -> None:
    optimizer.eval()


def _muon_state(name: str, p: torch.Tensor) -> float:
    """Muon's momentum on a hidden matrix; AdamW's m and v on the rest."""
    return 1.0 if hidden_matrix(name, p) else 2.0


def _adafactor_state(name: str, p: torch.Tensor) -> float:
    """torch's Adafactor: a tensor of 2+ dims keeps a row and a column second moment (shape[:-1]
    and shape[:-2] + shape[-1:]), a vector its full second moment."""
    if p.ndim < 2:
        return 1.0
    rows, cols = math.prod(p.shape[:-1]), math.prod(p.shape[:-2]) * p.shape[-1]
    return (rows + cols) / p.numel()


OPTIMIZERS.register("muon")(OptimizerEntry(_muon, default_lr=0.03, named=True, state=_muon_state))
OPTIMIZERS.register("lamb")(OptimizerEntry(_lamb, default_lr=0.02, state=2.0))  # m, v
OPTIMIZERS.register("adafactor")(OptimizerEntry(_adafactor, default_lr=0.05, state=_adafactor_state))
OPTIMIZERS.register("lion")(OptimizerEntry(_lion, default_lr=0.003, state=1.0))  # m
OPTIMIZERS.register("schedule-free-adamw")(OptimizerEntry(_schedule_free, default_lr=0.02,
                                                          train=_train, eval=_eval, state=2.0))  # z, v
