"""Every optimizer against a plain numpy implementation of its formula. The formulas are those of
the article's six optimizers as written in docs/design.md (section "Optimizers"); adamw and lars,
the two added for large batches, and the five newer ones (muon, lamb, adafactor, lion,
schedule-free-adamw), each from its paper, are checked the same way."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from raydist.optim import OPTIMIZERS, build_optimizer, training
from raydist.optim.recent import hidden_matrix

pytestmark = pytest.mark.unit

LR, B, B1, B2, EPS = 0.05, 0.8, 0.85, 0.95, 1e-6
STEPS = 60
WD = 0.1
"""weight decay in the test of every rule that decouples it"""
DECOUPLED = {"adamw", "muon", "lamb", "adafactor", "lion", "schedule-free-adamw"}
NEW = ["muon", "lamb", "adafactor", "lion", "schedule-free-adamw"]


def newton_schulz(u):
    """Keller Jordan's quintic iteration: 5 steps with (a, b, c) = (3.4445, -4.7750, 2.0315) on
    u / ||u||_F, on the wide orientation."""
    x = u.T if u.shape[0] > u.shape[1] else u
    x = x / max(np.linalg.norm(x), 1e-7)
    for _ in range(5):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    return x.T if u.shape[0] > u.shape[1] else x


def rms(x):
    return np.sqrt(np.mean(x * x))


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
        return adam(w, g, s, t, wd=WD)

    def lars(w, g, s, t):
        ratio = 0.001 * np.linalg.norm(w) / np.linalg.norm(g)
        s["m"] = B * s.get("m", 0) + ratio * LR * g
        return w - s["m"]

    def muon(w, g, s, t):
        """Muon (Jordan et al. 2024) on a matrix, Nesterov momentum, Moonshot's lr 0.2*sqrt(max
        dim)*lr (Liu et al. 2025); AdamW on any other tensor."""
        if w.ndim != 2:
            return adamw(w, g, s, t)
        s["m"] = B * s.get("m", 0) + (1 - B) * g
        o = newton_schulz((1 - B) * g + B * s["m"])
        return w * (1 - LR * WD) - LR * 0.2 * np.sqrt(max(w.shape)) * o

    def lamb(w, g, s, t):
        """You et al. 2019, Algorithm 2 (phi the identity)."""
        s["m"] = B1 * s.get("m", 0) + (1 - B1) * g
        s["v"] = B2 * s.get("v", 0) + (1 - B2) * g * g
        u = (s["m"] / (1 - B1**t)) / (np.sqrt(s["v"] / (1 - B2**t)) + EPS) + WD * w
        return w - LR * np.linalg.norm(w) / np.linalg.norm(u) * u

    def adafactor(w, g, s, t):
        """Shazeer & Stern 2018, Algorithm 4 (matrices) and 5 (vectors): beta2_t = 1 - t^-0.8,
        no momentum, update clipping d = 1, relative step rho_t = min(lr, 1/sqrt(t)) times
        max(eps2 = 1e-3, RMS(w)); torch's decoupled decay lr*wd*w."""
        beta = 1 - t**-0.8
        if w.ndim == 2:
            s["R"] = beta * s.get("R", 0) + (1 - beta) * (g * g).sum(axis=1)
            s["C"] = beta * s.get("C", 0) + (1 - beta) * (g * g).sum(axis=0)
            v = np.outer(s["R"], s["C"]) / s["R"].sum()
        else:
            v = s["V"] = beta * s.get("V", 0) + (1 - beta) * g * g
        u = g / np.sqrt(v)
        u = u / max(1.0, rms(u))
        return w * (1 - LR * WD) - max(1e-3, rms(w)) * min(LR, 1 / np.sqrt(t)) * u

    def lion(w, g, s, t):
        """Chen et al. 2023, Program 1."""
        c = B1 * s.get("m", 0) + (1 - B1) * g
        s["m"] = B2 * s.get("m", 0) + (1 - B2) * g
        return w - LR * (np.sign(c) + WD * w)

    def schedule_free(w, g, s, t):
        """Defazio et al. 2024, Algorithm 1 with v bias-corrected (the package's AdamW; its
        `paper` variant scales lr by sqrt(1-B2^t) instead): gradients at y, x the average of
        the z steps with weights lr^2. Returns y, where the next gradient is taken."""
        x, z = s.get("x", w), s.get("z", w)
        y = (1 - B1) * z + B1 * x
        s["v"] = B2 * s.get("v", 0) + (1 - B2) * g * g
        z = z - LR * (g / (np.sqrt(s["v"] / (1 - B2**t)) + EPS) + WD * y)
        c = LR**2 / (t * LR**2)
        s["x"], s["z"] = (1 - c) * x + c * z, z
        return (1 - B1) * s["z"] + B1 * s["x"]

    return {"gd": sgd, "sgd": sgd, "momentum": momentum, "adagrad": adagrad, "rmsprop": rmsprop,
            "adam": adam, "adamw": adamw, "lars": lars, "muon": muon, "lamb": lamb,
            "adafactor": adafactor, "lion": lion, "schedule-free-adamw": schedule_free}[name]


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_optimizer_follows_formula(name):
    """Over STEPS steps on random gradients, in training mode (schedule-free: the weights y)."""
    rng = np.random.default_rng(0)
    shapes = [(5, 3), (4,), (3, 6)]
    ws = [rng.normal(size=s) for s in shapes]
    params = [torch.tensor(w, dtype=torch.float64, requires_grad=True) for w in ws]
    wd = WD if name in DECOUPLED else 0.0
    opt = build_optimizer(name, params, LR, beta=B, beta1=B1, beta2=B2, eps=EPS, weight_decay=wd)
    rule, states = numpy_rule(name), [{} for _ in shapes]
    worst = 0.0
    with training(name, opt):
        for t in range(1, STEPS + 1):
            grads = [rng.normal(size=s) for s in shapes]
            for p, g in zip(params, grads, strict=True):
                p.grad = torch.tensor(g)
            opt.step()
            ws = [rule(w, g, s, t) for w, g, s in zip(ws, grads, states, strict=True)]
            worst = max(worst, *(np.abs(p.detach().numpy() - w).max()
                                 for p, w in zip(params, ws, strict=True)))
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
    assert {"gd", "sgd", "momentum", "adagrad", "rmsprop", "adam", "adamw", *NEW} <= set(OPTIMIZERS.names())


def test_schedule_free_evaluates_and_keeps_x_outside_training():
    """Out of training mode the parameters hold x (the average of the z steps), the weights
    raydist evaluates and saves; back in training they hold y again."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 3))
    p = torch.tensor(w, requires_grad=True)
    opt = build_optimizer("schedule-free-adamw", [p], LR, beta1=B1, beta2=B2, eps=EPS, weight_decay=WD)
    rule, state = numpy_rule("schedule-free-adamw"), {}
    for epoch in range(3):
        with training("schedule-free-adamw", opt):
            for t in range(10 * epoch + 1, 10 * epoch + 11):
                g = rng.normal(size=w.shape)
                p.grad = torch.tensor(g)
                opt.step()
                y = rule(w, g, state, t)
            assert np.abs(p.detach().numpy() - y).max() <= 1e-9
        assert np.abs(p.detach().numpy() - state["x"]).max() <= 1e-9
        assert np.abs(state["x"] - y).max() > 1e-3  # x and y differ: the test tells them apart


@pytest.mark.parametrize("name,shape,hidden", [
    ("fc0.0.weight", (16, 64), True), ("block3.attn.qkv.weight", (96, 32), True),
    ("block0.mlp.2.weight", (32, 128), True), ("layer.multihead.in_proj_weight", (96, 32), True),
    ("", (5, 3), True),  # no name: the shape decides
    ("fc0.0.bias", (16,), False), ("block0.ln1.weight", (32,), False),
    ("head.weight", (10, 16), False), ("head.1.weight", (100, 32), False),
    ("lm_head.weight", (100, 32), False),
    ("embed.tok.weight", (100, 32), False), ("embed.pos", (16, 32), False),
    ("embedding.weight", (100, 32), False), ("stem.1.weight", (16, 3, 3, 3), False),
])
def test_muon_takes_the_hidden_matrices_adamw_the_rest(name, shape, hidden):
    assert hidden_matrix(name, torch.zeros(shape)) is hidden


def test_muon_state_follows_the_parameters_order_and_reloads():
    """Muon and AdamW tensors interleave: state index i is the i-th tensor given (ps keys a
    shard's state by position), and a reloaded optimizer continues as the first would have."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    names = ["fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias", "head.weight", "head.bias"]
    twin = copy.deepcopy(model)
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(6)]
    opts = [build_optimizer("muon", zip(names, m.parameters(), strict=True), LR, beta=B)
            for m in (model, twin)]

    def steps(m, opt, gs):
        for g in gs:
            for p, gi in zip(m.parameters(), g, strict=True):
                p.grad = gi.clone()
            opt.step()

    steps(model, opts[0], grads)
    steps(twin, opts[1], grads[:3])
    saved = opts[1].state_dict()
    adamw = ["exp_avg", "exp_avg_sq", "step"]
    assert [sorted(saved["state"][i]) for i in range(6)] == [
        ["momentum_buffer"], adamw, ["momentum_buffer"], adamw, adamw, adamw]
    fresh = build_optimizer("muon", zip(names, twin.parameters(), strict=True), LR, beta=B)
    fresh.load_state_dict(saved)
    steps(twin, fresh, grads[3:])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
