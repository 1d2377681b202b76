"""Every optimizer against a plain numpy implementation of its formula. The formulas are those of
the article's six optimizers as written in docs/design.md (section "Optimizers"); adamw and lars,
the two added for large batches, are checked the same way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raydist.optim import OPTIMIZERS, build_optimizer

pytestmark = pytest.mark.unit

LR, B, B1, B2, EPS = 0.05, 0.8, 0.85, 0.95, 1e-6
STEPS = 60


def numpy_rule(name: str):
    """(state init, update) of the formula in docs/design.md, "Optimizers"; every accumulator
    starts at 0."""
    def sgd(w, g, s, t):
        return w - LR * g

    def momentum(w, g, s, t):
        s["m"] = B * s.get("m", 0) + (1 - B) * g
        return w - LR * s["m"]

    def adagrad(w, g, s, t):
        s["G"] = s.get("G", 0) + g * g
        return w - LR * g / (np.sqrt(s["G"]) + EPS)

    def rmsprop(w, g, s, t):
        s["R"] = B * s.get("R", 0) + (1 - B) * g * g
        return w - LR * g / (np.sqrt(s["R"]) + EPS)

    def adam(w, g, s, t, wd=0.0):
        w = w * (1 - LR * wd)
        s["m"] = B1 * s.get("m", 0) + (1 - B1) * g
        s["r"] = B2 * s.get("r", 0) + (1 - B2) * g * g
        m_hat, r_hat = s["m"] / (1 - B1**t), s["r"] / (1 - B2**t)
        return w - LR * m_hat / (np.sqrt(r_hat) + EPS)

    def adamw(w, g, s, t):
        return adam(w, g, s, t, wd=0.1)

    def lars(w, g, s, t):
        ratio = 0.001 * np.linalg.norm(w) / np.linalg.norm(g)
        s["m"] = B * s.get("m", 0) + ratio * LR * g
        return w - s["m"]

    return {"gd": sgd, "sgd": sgd, "momentum": momentum, "adagrad": adagrad, "rmsprop": rmsprop,
            "adam": adam, "adamw": adamw, "lars": lars}[name]


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_optimizer_follows_formula(name):
    rng = np.random.default_rng(0)
    shapes = [(5, 3), (4,)]
    ws = [rng.normal(size=s) for s in shapes]
    params = [torch.tensor(w, dtype=torch.float64, requires_grad=True) for w in ws]
    wd = 0.1 if name == "adamw" else 0.0
    opt = build_optimizer(name, params, LR, beta=B, beta1=B1, beta2=B2, eps=EPS, weight_decay=wd)
    rule, states = numpy_rule(name), [{} for _ in shapes]
    worst = 0.0
    for t in range(1, STEPS + 1):
        grads = [rng.normal(size=s) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.tensor(g)
        opt.step()
        ws = [rule(w, g, s, t) for w, g, s in zip(ws, grads, states, strict=True)]
        worst = max(worst, *(np.abs(p.detach().numpy() - w).max() for p, w in zip(params, ws, strict=True)))
    assert worst <= 1e-9


def test_torch_momentum_is_not_the_article_formula():
    """Why `momentum` is our own: torch's SGD starts the buffer at g, not at (1-b)*g."""
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    torch_opt = torch.optim.SGD([p], lr=LR, momentum=B, dampening=1 - B)
    p.grad = torch.ones(3, dtype=torch.float64)
    torch_opt.step()
    ours = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = build_optimizer("momentum", [ours], LR, beta=B)
    ours.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    assert torch.allclose(ours, torch.full((3,), -LR * (1 - B), dtype=torch.float64))
    assert not torch.allclose(p, ours)


def test_gd_is_full_batch_and_every_entry_documents_a_default_lr():
    assert [n for n in OPTIMIZERS.names() if OPTIMIZERS[n].full_batch] == ["gd"]
    assert all(OPTIMIZERS[n].default_lr > 0 for n in OPTIMIZERS.names())
    assert {"gd", "sgd", "momentum", "adagrad", "rmsprop", "adam", "adamw"} <= set(OPTIMIZERS.names())
