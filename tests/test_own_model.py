"""A user's own model, data and loss by import path: the example project's model (examples/resmlp,
a residual MLP that is not an nn.Sequential), from a module outside the repository on PYTHONPATH,
under every strategy through the real CLI equals local; and every mistake one line, exit 2, no
folder."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from cli_driver import drive

from raydist.cli import main
from raydist.config import RunSpec
from raydist.train import train

REPO = Path(__file__).resolve().parents[1]
USER = textwrap.dedent('''
    import numpy as np
    import torch
    from torch import nn

    class Plain(nn.Module):
        def __init__(self, n, out):
            super().__init__()
            self.a, self.b = nn.Linear(n, 16), nn.Linear(16, out)
        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    class Crossed(Plain):
        def pipeline_blocks(self):
            return [self.b, self.a]

    class Partial(Plain):
        def pipeline_blocks(self):
            return [self.a]

    def plain(data):
        return Plain(data.n_features, data.out_dim)

    def crossed(data):
        return Crossed(data.n_features, data.out_dim)

    def partial(data):
        return Partial(data.n_features, data.out_dim)

    def boom(data, width=8):
        raise ValueError("width must be even")

    def five(data):
        return 5

    width = 3

    def wrong(data):
        return nn.Linear(data.n_features, 3)

    def short():
        return torch.zeros(10, 3), torch.zeros(9, dtype=torch.long)

    def listy():
        return [[1.0, 2.0]], [0]

    def holes():
        x = np.ones((20, 3), dtype=np.float32)
        x[7, 1] = np.nan
        return x, np.zeros(20, dtype=np.int64)

    def regression(n=300):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 4, generator=g)
        return {"x_train": x[:240], "y_train": x[:240] @ torch.tensor([1.0, -1.0, 0.5, 2.0]),
                "x_val": x[240:], "y_val": x[240:] @ torch.tensor([1.0, -1.0, 0.5, 2.0])}

    def l1(out, y):
        return (out - y).abs().sum()
''')


def max_diff(a, b) -> float:
    assert list(a) == list(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture
def user(tmp_path, monkeypatch):
    folder = tmp_path / "usercode"
    folder.mkdir()
    (folder / "usermod.py").write_text(USER)
    monkeypatch.syspath_prepend(str(folder))
    return folder


# --- mistakes: one line, exit 2, no output folder ---------------------------------------------

BAD = {
    "no module": (["--model", "nosuchmod:make"], "model: cannot import nosuchmod (ModuleNotFoundError: "
                  "No module named 'nosuchmod'); is it on PYTHONPATH?"),
    "no attribute": (["--model", "resmlp:make_modle"],
                     "model: resmlp has no attribute 'make_modle' (did you mean 'make_model'?)"),
    "factory raises": (["--model", "usermod:boom"], "model: usermod:boom raised ValueError: width must be even"),
    "not callable": (["--model", "usermod:width"], "model: usermod:width is not callable"),
    "not a module": (["--model", "usermod:five"], "model: usermod:five returned int; expected a torch.nn.Module"),
    "output does not fit": (["--model", "usermod:wrong"], "model: usermod:wrong's output for 2 samples has "
                            "shape (2, 3); data 'digits' needs (2, 10) (10 classes, task ce)"),
    "unknown model_args": (["--model", "resmlp:make_model", "--model-arg", "widht=3"],
                           "model_args: resmlp:make_model takes no argument 'widht' (it takes: width, depth)"),
    "unknown data_args": (["--model", "resmlp:make_model", "--data", "resmlp:load", "--data-arg", "rows=5"],
                          "data_args: resmlp:load takes no argument 'rows' (it takes: n, features, classes, seed)"),
    "data rows differ": (["--data", "usermod:short"],
                         "data: usermod:short returned x with 10 rows and y with 9; expected as many"),
    "data not tensors": (["--data", "usermod:listy"],
                         "data: usermod:listy returned x as list; expected a tensor or a numpy array"),
    "data with a NaN": (["--data", "usermod:holes"],
                        "data: usermod:holes returned x with a NaN or infinite value (row 7)"),
    "bad loss path": (["--loss", "l1"], "loss: got 'l1'; expected module.path:function"),
    "loss not there": (["--loss", "usermod:l2"], "loss: usermod has no attribute 'l2' (did you mean 'l1'?)"),
    "pipeline without blocks": (["--model", "usermod:plain", "--strategy", "pipeline"],
                                "model: a pipeline cuts the model into blocks, and usermod:plain gives none: "
                                "return an nn.Sequential of its blocks, or give the module a method "
                                "pipeline_blocks(self) -> list[nn.Module] whose blocks, applied in order, "
                                "equal its forward"),
    "blocks out of order": (["--model", "usermod:crossed", "--strategy", "pipeline"],
                            "model: usermod:crossed's pipeline_blocks(), applied in order, give another output "
                            "than its forward; return an nn.Sequential of its blocks, or give the module a "
                            "method pipeline_blocks(self) -> list[nn.Module] whose blocks, applied in order, "
                            "equal its forward"),
    "blocks leave parameters out": (["--model", "usermod:partial", "--strategy", "pipeline"],
                                    "model: usermod:partial's pipeline_blocks() leave out b.bias, b.weight; "
                                    "every parameter and buffer must be in one of the blocks"),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", BAD)
def test_a_mistake_in_a_users_code_is_one_line(case, user, tmp_path, capsys):
    args, message = BAD[case]
    out = tmp_path / "never"
    assert main(["train", *args, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not out.exists()


@pytest.mark.unit
def test_a_users_loss_and_regression_data(user, tmp_path):
    got = train(RunSpec.from_dict({"data": "usermod:regression", "loss": "usermod:l1", "epochs": 3,
                                   "out": str(tmp_path)}), lambda r: None)
    losses = [r["train_loss"] for r in got.metrics]
    assert losses[-1] < losses[0] and "val_accuracy" not in got.metrics[-1]


@pytest.mark.unit
def test_model_args_reach_the_factory_and_model_pt_has_its_own_keys(tmp_path):
    assert main(["train", "--config", str(REPO / "examples" / "resmlp" / "train.yaml"), "--strategy", "local",
                 "--workers", "1", "--model-arg", "depth=1", "--epochs", "1", "--out", str(tmp_path)]) == 0
    keys = list(torch.load(tmp_path / "model.pt"))
    assert keys == ["inp.0.weight", "inp.0.bias", "blocks.0.norm.weight", "blocks.0.norm.bias",
                    "blocks.0.fc.weight", "blocks.0.fc.bias", "out.weight", "out.bias"]


# --- every strategy trains the user's model, equal to local -----------------------------------

@pytest.mark.ray
def test_a_module_outside_the_repository_under_each_strategy_through_the_cli(ray_local, tmp_path):
    """The commands a user types, through the CLI's entry point on an embedded Ray of 3 CPUs, the
    most of them asks for (one process for the five: tests/cli_driver.py), the example
    model (a residual MLP that is not an nn.Sequential, 32 wide, 3 blocks) in a module of its
    own on PYTHONPATH: ddp on 2 workers, ps sync on 2 servers, a 2-stage pipeline and fsdp on 2
    workers (both by pipeline_blocks) end where local does, each model.pt with the user's own
    keys. One run per strategy serves both facts (an in-process run of each cost a Ray Train fit
    more)."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    source = (REPO / "examples" / "resmlp" / "resmlp.py").read_text()
    (folder / "mine.py").write_text(source.replace("def make_model(", "def make("))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(folder)  # only there: not the repository's example
    args = ["--model", "mine:make", "--model-arg", "width=32", "--model-arg", "depth=3",
            "--data", "mine:load", "--data-arg", "n=600", "--optimizer", "adam", "--epochs", "2",
            "--batch-size", "64"]
    runs = {"local": [], "ddp": ["--strategy", "ddp", "--workers", "2"],
            "ps": ["--strategy", "ps", "--mode", "sync", "--workers", "2", "--servers", "2"],
            "pipeline": ["--strategy", "pipeline", "--stages", "2", "--microbatches", "4"],
            "fsdp": ["--strategy", "fsdp", "--workers", "2"]}
    out = tmp_path / "runs"
    result = drive(out, [{"name": name, "args": [*args, *extra]} for name, extra in runs.items()],
                   env, 420, cpus=3, cwd=tmp_path)  # ps's 3 CPUs, as the CLI sizes its own Ray
    log = (out / "driver.log").read_text()
    for name in runs:
        assert result["runs"].get(name, {}).get("code") == 0, (name, result["runs"].get(name), log[-3000:])
    assert "Token authentication" not in log  # on, and quiet about it
    local = torch.load(out / "local" / "model.pt")
    assert list(local) == ["inp.0.weight", "inp.0.bias", *(f"blocks.{i}.{part}" for i in range(3) for part in (
        "norm.weight", "norm.bias", "fc.weight", "fc.bias")), "out.weight", "out.bias"]  # the user's own keys
    for name in ("ddp", "ps", "pipeline", "fsdp"):
        assert max_diff(local, torch.load(out / name / "model.pt")) <= 1e-5, name  # keys too
    assert pd.read_csv(out / "ddp" / "metrics.csv")["world_size"].tolist() == [2, 2]


@pytest.mark.unit
def test_the_example_sweep_searches_a_model_arg():
    from raydist import sweep
    from raydist.config import load_sweep

    s = load_sweep(REPO / "examples" / "resmlp" / "sweep.yaml")
    assert sweep.total_trials(s) == 2 * 3  # width grid x (local, ddp 2, pipeline 2)
    grid = s.trial_grid()
    specs = [s.run_spec({"variant": v}, "/tmp/t") for v in grid]
    assert sorted({(x.strategy, x.model_args["width"], x.model_args["depth"]) for x in specs}) == [
        ("ddp", 32, 3), ("ddp", 128, 3), ("local", 32, 3), ("local", 128, 3), ("pipeline", 32, 3),
        ("pipeline", 128, 3)]
