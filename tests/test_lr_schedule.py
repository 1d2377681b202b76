"""Learning rates without Ray: each schedule's lr per optimizer step against its closed form
written out here, weak scaling's global batch and the scaled lr per strategy, local stepping its
schedule once per optimizer step (against a plain torch loop), the records, the refusals, and
the knobs a scheduled or weak-scaling run may not change when it resumes."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import yaml

from raydist import report
from raydist.cli import main
from raydist.config import ConfigError, RunSpec
from raydist.data import load_data
from raydist.engine import global_batches, loss_fn, make_optimizer, make_scheduler
from raydist.engine.preflight import check_resumable
from raydist.engine.record import documented
from raydist.models import build_model
from raydist.train import train

pytestmark = pytest.mark.unit

SMALL = {"model": "mlp", "data": "digits", "hidden": [16], "epochs": 2, "val_fraction": 0.1}


def lrs(raw: dict, steps: int) -> list[float]:
    """The lr each of `steps` optimizer steps uses, as the optimizer sees it at that step."""
    spec = RunSpec.from_dict({"optimizer": "sgd", "lr": 0.1, **raw})
    optimizer = make_optimizer(spec, [torch.nn.Parameter(torch.zeros(1))])
    scheduler = make_scheduler(spec, optimizer, steps)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_warmup_then_cosine_to_zero():
    # W = 4 warmup steps of lr (s+1)/(W+1), then 0.5 (1 + cos(pi k / 16)) over the other 16
    expected = [0.1 * (s + 1) / 5 for s in range(4)]
    expected += [0.1 * 0.5 * (1 + math.cos(math.pi * k / 16)) for k in range(16)]
    got = lrs({"warmup_steps": 4, "lr_schedule": "cosine"}, 20)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert got[4] == pytest.approx(0.1) and 0 < got[-1] < 0.1 * 0.01  # full lr after warmup, ~0 at the end


def test_step_decay_and_constant_warmup():
    got = lrs({"lr_schedule": "step", "lr_step_size": 3, "lr_gamma": 0.5}, 10)
    assert got == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025, 0.025, 0.0125], rel=1e-12)
    got = lrs({"warmup_steps": 2, "lr_schedule": "step", "lr_step_size": 2, "lr_gamma": 0.1}, 6)
    assert got == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.1, 0.01, 0.01], rel=1e-12)
    assert lrs({"warmup_steps": 3}, 6) == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1], rel=1e-12)
    assert lrs({}, 3) == [0.1, 0.1, 0.1]  # no schedule: the lr as given, bit for bit


@pytest.mark.parametrize("raw,global_batch,lr", [
    ({"strategy": "local", "batch_per_worker": 32}, 32, 0.1 * 32 / 64),
    ({"strategy": "ddp", "workers": 4, "batch_per_worker": 32}, 128, 0.1 * 128 / 64),
    ({"strategy": "ps", "workers": 3, "batch_per_worker": 32}, 96, 0.1 * 96 / 64),
    # pipeline: its stages split the model, not the batch
    ({"strategy": "pipeline", "stages": 2, "batch_per_worker": 32}, 32, 0.1 * 32 / 64),
    ({"strategy": "ddp", "workers": 4, "batch_size": 256, "base_batch": 128}, 256, 0.2),
    ({"strategy": "ddp", "workers": 2, "batch_per_worker": 128, "lr_scaling": "sqrt"}, 256, 0.2),
    ({"strategy": "ddp", "workers": 2, "batch_per_worker": 128, "lr_scaling": "none"}, 256, 0.1),
])
def test_global_batch_and_scaled_lr(raw, global_batch, lr):
    from raydist.engine import effective_lr

    spec = RunSpec.from_dict({"optimizer": "sgd", "lr": 0.1, "lr_scaling": "linear", **raw})
    assert (spec.global_batch, effective_lr(spec)) == (global_batch, pytest.approx(lr, rel=1e-12))
    assert make_optimizer(spec, [torch.nn.Parameter(torch.zeros(1))]).param_groups[0]["lr"] == \
        pytest.approx(lr, rel=1e-12)


def test_local_steps_its_schedule_once_per_optimizer_step(tmp_path):
    """local with weak-scaling batch, linear scaling, warmup and cosine equals a plain torch loop
    that sets each step's lr from the closed form."""
    raw = {**SMALL, "optimizer": "adam", "lr": 0.01, "batch_per_worker": 48, "lr_scaling": "linear",
           "base_batch": 96, "warmup_steps": 7, "lr_schedule": "cosine", "out": str(tmp_path / "run")}
    spec = RunSpec.from_dict(raw)
    result = train(spec, lambda rec: None)

    data = load_data(spec)
    model = build_model(spec, data)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
    steps = 2 * math.ceil(data.n_train / 48)
    s = 0
    for epoch in (1, 2):
        for batch in global_batches(spec, data, epoch):
            k = s - 7
            factor = (s + 1) / 8 if s < 7 else 0.5 * (1 + math.cos(math.pi * k / (steps - 7)))
            optimizer.param_groups[0]["lr"] = 0.01 * 0.5 * factor  # scaled by 48 / 96
            model.zero_grad()
            (loss_fn(data.task)(model(data.x_train[batch]), data.y_train[batch]) / len(batch)).backward()
            optimizer.step()
            s += 1
    diff = max((result.state_dict[k] - v).abs().max().item() for k, v in model.state_dict().items())
    assert diff <= 1e-6, diff
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics["global_batch"].tolist() == [48, 48]
    assert metrics["effective_lr"].tolist() == pytest.approx([0.005, 0.005], rel=1e-12)
    assert all(documented(c) for c in metrics.columns)
    saved = yaml.safe_load((tmp_path / "run" / "spec.yaml").read_text())
    assert (saved["batch_size"], saved["batch_per_worker"]) == (None, 48)
    assert RunSpec.from_dict(saved).global_batch == 48  # spec.yaml runs again as it is


def test_replace_swaps_one_batch_knob_for_the_other():
    spec = RunSpec.from_dict({"strategy": "ddp", "workers": 2})
    assert (spec.batch_size, spec.global_batch) == (64, 64)
    weak = spec.replace(batch_per_worker=16)
    assert (weak.batch_size, weak.global_batch) == (None, 32)
    assert weak.replace(batch_size=8).global_batch == 8


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "64", "--batch-per-worker", "32"],
     "batch_per_worker: got 32 with batch_size 64; give one of them: batch_size is the global batch, "
     "batch_per_worker x the data-parallel replicas makes it"),
    (["--strategy", "ddp", "--workers", "1-2", "--batch-per-worker", "32"],
     "batch_per_worker: got 32 with elastic workers [1, 2]; the global batch would change with the "
     "group's size: give batch_size instead"),
    (["--optimizer", "gd", "--lr-scaling", "linear"],
     "lr_scaling: got 'linear' with optimizer gd, which steps on the whole training set whatever the "
     "batch; expected none"),
    (["--lr-schedule", "cosin"],
     "lr_schedule: unknown value 'cosin' (did you mean 'cosine'?); expected one of constant, cosine, step"),
    (["--lr-scaling", "square"],
     "lr_scaling: unknown value 'square' (did you mean 'sqrt'?); expected one of none, linear, sqrt"),
    (["--lr-gamma", "0"], "lr_gamma: got 0.0; expected a number in (0, 1]"),
    (["--warmup-steps", "-1"], "warmup_steps: got -1; expected an integer >= 0"),
])
def test_mistakes_are_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "never"
    assert main(["train", *args, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not out.exists()


def saved_run(tmp_path, **raw) -> RunSpec:
    spec = RunSpec.from_dict({**SMALL, "out": str(tmp_path), **raw})
    spec.save(tmp_path / "spec.yaml")
    return spec


def test_a_schedule_over_the_whole_run_pins_epochs_on_resume(tmp_path):
    spec = saved_run(tmp_path, strategy="pipeline", lr_schedule="cosine", warmup_steps=5)
    with pytest.raises(ConfigError) as e:
        check_resumable(spec.replace(epochs=3), tmp_path / "spec.yaml")
    assert str(e.value) == (f"epochs: got 3, but {tmp_path} holds a pipeline run with epochs=2, and "
                            "lr_schedule cosine spans the run's optimizer steps, which epochs sets; "
                            "resume it with epochs=2 or choose another out")
    check_resumable(spec, tmp_path / "spec.yaml")
    step = saved_run(tmp_path, strategy="pipeline", lr_schedule="step", warmup_steps=5)
    check_resumable(step.replace(epochs=3), tmp_path / "spec.yaml")  # step decay: no horizon


def test_weak_scaling_pins_ddp_workers_on_resume(tmp_path):
    spec = saved_run(tmp_path, strategy="ddp", workers=2, batch_per_worker=32)
    with pytest.raises(ConfigError) as e:
        check_resumable(spec.replace(workers=3), tmp_path / "spec.yaml")
    assert str(e.value) == (f"workers: got 3, but {tmp_path} holds a ddp run with workers=2, and the "
                            "global batch is batch_per_worker (32) x workers; resume it with workers=2 "
                            "or choose another out")
    strong = saved_run(tmp_path, strategy="ddp", workers=2, batch_size=64)
    check_resumable(strong.replace(workers=4), tmp_path / "spec.yaml")


def test_a_spec_saved_before_the_schedule_knobs_resumes(tmp_path):
    spec = saved_run(tmp_path, strategy="ps")
    old = yaml.safe_load((tmp_path / "spec.yaml").read_text())
    for knob in ("batch_per_worker", "lr_scaling", "base_batch", "warmup_steps", "lr_schedule",
                 "lr_step_size", "lr_gamma"):
        del old[knob]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(old))
    check_resumable(spec.replace(epochs=4), tmp_path / "spec.yaml")


def test_report_tells_strong_from_weak_scaling(tmp_path):
    """A hand-made results.csv: ddp on 1 and 2 workers at a fixed global batch of 64 (strong) and
    at 32 per worker (weak); throughput = epoch 2's samples/s, time to target = epoch 1 or 2."""
    rows = []
    # (batch_size, batch_per_worker, workers, global batch, samples/s of epoch 2, accuracy, wall time)
    for i, (bs, bpw, n, gb, sps, acc, wall) in enumerate([
            (64, None, 1, 64, 100, [0.5, 0.95], [2, 4]), (64, None, 2, 64, 150, [0.95, 0.96], [1, 2]),
            (None, 32, 1, 32, 80, [0.95, 0.96], [3, 6]), (None, 32, 2, 64, 160, [0.5, 0.95], [2, 4])]):
        for epoch in (1, 2):
            rows.append({"trial_id": f"t{i}", "status": "completed", "epoch": epoch,
                         "val_accuracy": acc[epoch - 1], "samples_per_s": 10 if epoch == 1 else sps,
                         "wall_time_s": wall[epoch - 1], "global_batch": gb, "strategy": "ddp",
                         "optimizer": "adam", "workers": n, "batch_size": bs, "batch_per_worker": bpw,
                         "seed": 0})
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    (tmp_path / "sweep.yaml").write_text("model: mlp\nsweep: {target: 0.9}\n")
    lines = report.write(tmp_path).read_text().splitlines()
    assert ("Scaling: strong (batch_size: the same global batch at every N) and weak (batch_per_worker: "
            "the global batch grows with the replicas). speedup = samples/s(N) / samples/s(1); "
            "efficiency = speedup / N; ttt_speedup = time to target(1) / time to target(N); vs_local = "
            "samples/s / samples/s of local.") in lines
    assert ("| workers | scaling | global_batch | seeds | samples_per_s | speedup | efficiency | vs_local | "
            "time_to_target | ttt_speedup |") in lines
    assert {"| 1 | strong | 64 | 1 | 100 | 1.00 | 1.00 | - | 4.00 s | 1.00 |",
            "| 2 | strong | 64 | 1 | 150 | 1.50 | 0.75 | - | 1.00 s | 4.00 |",
            "| 1 | weak | 32 | 1 | 80 | 1.00 | 1.00 | - | 3.00 s | 1.00 |",
            "| 2 | weak | 64 | 1 | 160 | 2.00 | 1.00 | - | 4.00 s | 0.75 |"} <= set(lines)
    assert (tmp_path / "speedup.png").read_bytes()[:4] == b"\x89PNG"
