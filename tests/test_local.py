"""The reference strategy: it learns, it is deterministic, it writes the same files every time."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml

from raydist.cli import main
from raydist.config import RunSpec
from raydist.data import load_data
from raydist.engine import Diverged, evaluate, global_batches, train_epoch
from raydist.models import build_model
from raydist.optim import training
from raydist.strategies.local import Local
from raydist.train import train

pytestmark = pytest.mark.unit

SEED_SIX = ["gd", "sgd", "momentum", "adagrad", "rmsprop", "adam"]


def quiet(rec):
    pass


def test_adam_mlp_digits_reaches_90_percent_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "adam"
    assert main(["train", "--strategy", "local", "--model", "mlp", "--data", "digits",
                 "--optimizer", "adam", "--epochs", "5", "--out", str(out)]) == 0
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(progress) == 5
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns) == ["epoch", "train_loss", "val_loss", "val_accuracy", "samples_per_s",
                                     "epoch_time_s", "wall_time_s", "global_batch", "effective_lr",
                                     "grad_norm", "grad_norm_max", "model_state_bytes",
                                     "optimizer_state_bytes", "peak_rss_bytes"]
    assert pd.read_csv(out / "memory.csv")["worker"].tolist() == ["rank 0"] * 5
    assert (metrics["global_batch"] == 64).all() and (metrics["effective_lr"] == 0.01).all()
    assert metrics["epoch"].tolist() == [1, 2, 3, 4, 5]
    assert metrics["val_accuracy"].iloc[-1] >= 0.90
    spec = yaml.safe_load((out / "spec.yaml").read_text())
    assert spec["lr"] == 0.01 and spec["optimizer"] == "adam"  # the resolved default lr is written
    assert set(torch.load(out / "model.pt")) == {"fc0.0.weight", "fc0.0.bias", "head.weight", "head.bias"}
    assert yaml.safe_load((out / "machine.yaml").read_text())["threads_per_worker"] == 1


@pytest.mark.parametrize("name", [*SEED_SIX, "muon", "lamb", "adafactor", "lion", "schedule-free-adamw"])
def test_each_optimizer_at_its_default_lr_lowers_the_training_loss(name, tmp_path):
    spec = RunSpec.from_dict({"optimizer": name, "epochs": 4, "out": str(tmp_path)})
    metrics = train(spec, quiet).metrics
    losses = [m["train_loss"] for m in metrics]
    assert losses[-1] < losses[0] - 0.05, losses  # gd: 4 full-batch steps, the slowest


def test_schedule_free_reports_and_saves_the_weights_it_evaluates(tmp_path):
    """The record's val_loss and model.pt are of x, the average of the steps, not of y, where
    the gradients were taken."""
    spec = RunSpec.from_dict({"optimizer": "schedule-free-adamw", "epochs": 1, "out": str(tmp_path)})
    result = train(spec, quiet)
    data = load_data(spec)
    trainer = Local(spec, data)  # the run's first epoch again, by hand
    with training(spec.optimizer, trainer.optimizer):
        train_epoch(trainer.model, trainer.optimizer, data, global_batches(spec, data, 1))
        at_y = evaluate(trainer.model, data)["val_loss"]
    at_x = evaluate(trainer.model, data)["val_loss"]
    assert result.metrics[0]["val_loss"] == at_x != at_y
    saved = build_model(spec, data)
    saved.load_state_dict(torch.load(tmp_path / "model.pt"))
    assert evaluate(saved, data)["val_loss"] == at_x


def test_equal_seed_gives_bit_identical_model_file(tmp_path):
    for name in ("a", "b"):
        assert main(["train", "--epochs", "2", "--optimizer", "momentum", "--out", str(tmp_path / name)]) == 0
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()
    other = RunSpec.from_dict({"epochs": 2, "optimizer": "momentum", "seed": 1, "out": str(tmp_path / "c")})
    train(other, quiet)
    assert (tmp_path / "a" / "model.pt").read_bytes() != (tmp_path / "c" / "model.pt").read_bytes()


def test_config_file_flags_and_set_overrides_in_that_order(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"epochs: 1\nlr: 0.5\nbatch_size: 32\nout: {tmp_path / 'cfg'}\n")
    assert main(["train", "--config", str(cfg), "--lr", "0.02", "--set", "batch_size=16"]) == 0
    spec = yaml.safe_load((tmp_path / "cfg" / "spec.yaml").read_text())
    assert (spec["epochs"], spec["lr"], spec["batch_size"]) == (1, 0.02, 16)
    # spec.yaml is itself a config that reproduces the run
    assert RunSpec.from_dict(spec).to_dict() == spec


@pytest.mark.parametrize("model,data,extra", [
    ("cnn", "digits", {}),
    ("transformer", "text", {"layers": 1, "d_model": 32, "seq_len": 16, "text_chars": 5000}),
    ("mlp", "synthetic", {"hidden": [10], "optimizer": "adam", "lr": 0.05}),
])
def test_other_models_and_data_learn(model, data, extra, tmp_path):
    spec = RunSpec.from_dict({"model": model, "data": data, "epochs": 3, "out": str(tmp_path), **extra})
    losses = [m["train_loss"] for m in train(spec, quiet).metrics]
    assert losses[-1] < losses[0]


def test_the_articles_8_10_1_network_on_synthetic_data(tmp_path):
    spec = RunSpec.from_dict({"data": "synthetic", "hidden": [10], "epochs": 1, "out": str(tmp_path)})
    train(spec, quiet)
    shapes = {k: tuple(v.shape) for k, v in torch.load(tmp_path / "model.pt").items()}
    assert shapes == {"fc0.0.weight": (10, 8), "fc0.0.bias": (10,), "head.weight": (1, 10), "head.bias": (1,)}


def test_user_csv_classification_and_regression(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 3, generator=g)
    for kind, y in (("class", (x.sum(1) > 1.5).long()), ("reg", x @ torch.tensor([1.0, -2.0, 0.5]))):
        path = tmp_path / f"{kind}.csv"
        pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "target": y, "c": x[:, 2]}).to_csv(path, index=False)
        spec = RunSpec.from_dict({"data": f"csv:{path}", "target": "target", "epochs": 3,
                                  "out": str(tmp_path / kind)})
        metrics = train(spec, quiet).metrics
        assert ("val_accuracy" in metrics[-1]) == (kind == "class")
        assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]


def test_divergence_stops_the_run(tmp_path):
    spec = RunSpec.from_dict({"optimizer": "sgd", "lr": 1e30, "epochs": 3, "out": str(tmp_path / "nan")})
    with pytest.raises(Diverged, match="training loss is nan at epoch 1"):
        train(spec, quiet)
