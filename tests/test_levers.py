"""The training loop's levers under local (engine/levers.py): each one that should not change
what is computed does not (accumulation, checkpointing, compile: against the plain run), clipping
is torch's clip_grad_norm_ (against a loop written here in plain torch), bf16-mixed stays close to
float32, and every record measures the gradient's norm, whose spike a raised lr shows.

ddp, fsdp and tp against local: tests/test_levers_ray.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from raydist.config import RunSpec
from raydist.data import load_data
from raydist.engine import fit, global_batches
from raydist.engine.record import documented
from raydist.models import build_model
from raydist.strategies.local import Local
from raydist.train import train

pytestmark = pytest.mark.unit

MLP = {"model": "mlp", "data": "digits", "hidden": [16], "epochs": 3, "batch_size": 64, "seed": 0,
       "val_fraction": 0.1}
# a small gpt on a short text: each block's recompute and micro-steps go through attention too.
# sgd, not adam: adam's m / sqrt(v) lifts the round-off of a near-zero gradient (a rare
# character's embedding row) to a step of size lr, 2e-5 apart after 2 epochs (measured)
GPT = {"model": "gpt", "data": "text", "text_chars": 3000, "seq_len": 16, "d_model": 32, "layers": 2,
       "heads": 2, "epochs": 2, "batch_size": 32, "seed": 0, "optimizer": "sgd", "lr": 0.2}


def run(tmp: Path, base: dict, **changes: object):
    name = "_".join(f"{k}-{v}" for k, v in changes.items()) or "plain"
    spec = RunSpec.from_dict({**base, "strategy": "local", "out": str(tmp / name), **changes})
    return train(spec, report=lambda rec: None)


def gap(a, b) -> float:
    """The largest difference between two runs' final parameters (same keys, same order)."""
    assert list(a.state_dict) == list(b.state_dict)
    return max((a.state_dict[k] - b.state_dict[k]).abs().max().item() for k in a.state_dict)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return run(tmp_path_factory.mktemp("plain"), MLP)


@pytest.mark.parametrize("base", [MLP, GPT], ids=["mlp", "gpt"])
def test_accumulation_and_checkpointing_change_nothing(base, plain, tmp_path):
    """k = 4 micro-steps sum to the whole batch's gradient; recomputed activations are the
    same activations: both end where the plain run ends (round-off apart)."""
    reference = plain if base is MLP else run(tmp_path, base)
    accumulated = run(tmp_path, base, grad_accum_steps=4)
    recomputed = run(tmp_path, base, activation_checkpointing="blocks")
    assert gap(accumulated, reference) <= 1e-6
    assert gap(recomputed, reference) <= 1e-6
    for one in (accumulated, recomputed):
        assert [r["train_loss"] for r in one.metrics] == pytest.approx(
            [r["train_loss"] for r in reference.metrics], rel=1e-6)


def clipped_by_hand(spec: RunSpec, max_norm: float) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The reference: forward, mean cross-entropy, backward, clip_grad_norm_, SGD step, written in
    plain torch; returns the final parameters and every step's pre-clip norm."""
    data = load_data(spec)
    model = build_model(spec, data)  # the same initial weights (drawn from spec.seed)
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr)
    norms = []
    for epoch in range(1, spec.epochs + 1):
        for batch in global_batches(spec, data, epoch):
            opt.zero_grad()
            F.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item())
            opt.step()
    return model.state_dict(), norms


def test_clipping_is_torchs_clip_grad_norm(tmp_path):
    max_norm = 0.3
    spec = RunSpec.from_dict({**MLP, "optimizer": "sgd", "lr": 0.5, "out": str(tmp_path / "ref")})
    want, norms = clipped_by_hand(spec, max_norm)
    assert sum(n > max_norm for n in norms) > 0.8 * len(norms)  # the clip engages on most steps
    got = run(tmp_path, {**MLP, "optimizer": "sgd", "lr": 0.5}, clip_grad_norm=max_norm)
    assert max((got.state_dict[k] - want[k]).abs().max().item() for k in want) <= 1e-6
    per_epoch = len(norms) // spec.epochs
    for i, rec in enumerate(got.metrics):
        mine = norms[i * per_epoch:(i + 1) * per_epoch]
        assert rec["grad_norm"] == pytest.approx(sum(mine) / len(mine), rel=1e-5)
        assert rec["grad_norm_max"] == pytest.approx(max(mine), rel=1e-5)
        assert rec["grad_norm"] > max_norm


@pytest.mark.parametrize("base", [MLP, GPT], ids=["mlp", "gpt"])
def test_bf16_mixed_stays_within_3_percent_of_float32(base, plain, tmp_path):
    reference = plain if base is MLP else run(tmp_path, base)
    mixed = run(tmp_path, base, precision="bf16-mixed")
    assert mixed.metrics[-1]["val_loss"] == pytest.approx(reference.metrics[-1]["val_loss"], rel=0.03)
    assert mixed.metrics[-1]["val_loss"] != reference.metrics[-1]["val_loss"]  # bf16 really ran
    assert all(v.dtype == torch.float32 for v in mixed.state_dict.values())  # weights stay float32


def test_compile_equals_eager(tmp_path):
    """A few steps (compiling each block costs seconds here): one epoch of 7 equal batches (digits'
    1617 training samples), so one shape is compiled for training."""
    from torch._dynamo.utils import counters

    few = {**MLP, "epochs": 1, "batch_size": 231}
    eager = run(tmp_path, few)
    before = counters["frames"]["ok"]
    compiled = run(tmp_path, few, compile=True)
    assert counters["frames"]["ok"] >= before + 2  # each of mlp's 2 blocks really compiled
    assert gap(compiled, eager) <= 1e-5


def test_grad_norm_is_in_every_record(plain):
    for rec in plain.metrics:
        assert documented("grad_norm") and documented("grad_norm_max")
        assert 0 < rec["grad_norm"] <= rec["grad_norm_max"] < 100


def test_a_raised_lr_shows_as_a_grad_norm_spike(tmp_path):
    """After epoch 2 the lr goes up 40x: the gradient's norm in epoch 3 jumps."""
    spec = RunSpec.from_dict({**MLP, "optimizer": "sgd", "lr": 0.05, "out": str(tmp_path)})
    data = load_data(spec)
    trainer = Local(spec, data)

    def raise_lr(rec: dict) -> None:
        if rec["epoch"] == 2:
            sched = trainer.scheduler
            sched.base_lrs = [lr * 40 for lr in sched.base_lrs]
            for group in trainer.optimizer.param_groups:
                group["lr"] *= 40

    history = fit(spec, data, trainer, raise_lr)
    before = max(r["grad_norm_max"] for r in history[:2])
    assert history[2]["grad_norm_max"] > 3 * before
