"""Memory as a measure (issue 17): what a process holds, counted by hand here; each optimizer's
registered state factor against the state it keeps after a step; the record's per-worker list
kept out of flat tables and written to memory.csv; the predictions of raydist/memory/footprint.py by
hand and against a measured local run; the pre-flight's refusal under memory_per_worker."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from raydist import memory
from raydist.cli import main
from raydist.config import RunSpec
from raydist.engine import save_metrics, setup, train_epoch
from raydist.engine.record import documented, scalars, worker_rows
from raydist.memory import footprint
from raydist.optim import OPTIMIZERS, build_optimizer
from raydist.strategies import get
from raydist.train import train

pytestmark = pytest.mark.unit


def one_adam_step(model: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(3, 10)).sum().backward()
    opt.step()
    return opt


def test_linear_with_adam_after_one_step_holds_four_times_its_parameters():
    lin = nn.Linear(10, 5)  # 55 float32 parameters: 220 bytes
    opt = one_adam_step(lin)
    got = memory.state_bytes(lin, opt)
    # weights 220 + gradients 220 + Adam's m and v 440, and a float32 step count per tensor (2 x 4)
    assert got == {"model_state_bytes": 4 * 220 + 8, "optimizer_state_bytes": 2 * 220 + 8}


def test_a_view_and_a_shared_parameter_count_once():
    lin = nn.Linear(10, 5, bias=False)  # 200 bytes
    lin.register_buffer("row", lin.weight.detach()[0])  # a view of the weight's storage
    tied = nn.Sequential(lin, nn.Linear(5, 10, bias=False))
    tied[1].weight = nn.Parameter(lin.weight.detach().T)  # a transposed view: same storage
    assert memory.state_bytes(tied) == {"model_state_bytes": 200, "optimizer_state_bytes": 0}


def test_measure_has_the_peak_rss_and_worst_takes_each_field_s_maximum():
    got = memory.measure(nn.Linear(2, 2))
    assert got["peak_rss_bytes"] > 10 * 2**20  # a Python process with torch: tens of MiB at least
    assert "peak_gpu_bytes" not in got or torch.cuda.is_available()
    a = {"model_state_bytes": 5, "optimizer_state_bytes": 1, "peak_rss_bytes": 9}
    b = {"model_state_bytes": 7, "optimizer_state_bytes": 0, "peak_rss_bytes": 3}
    assert memory.worst([a, b]) == {"model_state_bytes": 7, "optimizer_state_bytes": 1, "peak_rss_bytes": 9}
    rec = memory.record_fields({"replica 0": a, "server 0": b})
    assert rec["per_worker_memory"] == [{"worker": "replica 0", **a}, {"worker": "server 0", **b}]
    assert memory.gib(3.1 * 2**30) == "3.1 GiB" and memory.gib(512 * 2**20) == "512.0 MiB"


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_s_registered_state_is_what_it_keeps(name: str):
    """The registry's bytes per parameter byte (raydist/optim), predicted per tensor, against the
    state the optimizer holds after a step on a gpt (matrices, vectors, embeddings, a head)."""
    spec = RunSpec.from_dict({"model": "gpt", "data": "text", "text_chars": 5000, "d_model": 16,
                              "layers": 1, "heads": 2, "optimizer": name})
    data, model, _ = setup(spec)
    opt = build_optimizer(name, model.named_parameters(), 1e-3)
    OPTIMIZERS[name].train(opt)
    train_epoch(model, opt, data, [torch.arange(4)])
    kept = memory.state_bytes(model, opt)["optimizer_state_bytes"]
    predicted = sum(OPTIMIZERS[name].state_bytes(n, p) for n, p in model.named_parameters())
    scalars_per_tensor = 8 * len(list(model.parameters()))  # step counts: left out of the factor
    assert predicted <= kept <= predicted + scalars_per_tensor, name
    # the plan's sizes name each block's tensors as the model does (muon splits by name)
    sizes = footprint.sizes_of(model, "gpt", name, data.x_train[:1])
    assert sum(sizes.state) == pytest.approx(predicted) and sum(sizes.params) == 4 * sum(
        p.numel() for p in model.parameters())


def test_the_per_worker_list_goes_to_memory_csv_not_to_metrics_csv(tmp_path):
    per = [{"worker": "stage 0", "model_state_bytes": 10, "peak_rss_bytes": 30},
           {"worker": "stage 1", "model_state_bytes": 20, "peak_rss_bytes": 40}]
    records = [{"epoch": e, "train_loss": 1.0, "model_state_bytes": 20, "per_worker_memory": per}
               for e in (1, 2)]
    save_metrics(tmp_path, records)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert list(metrics.columns) == ["epoch", "train_loss", "model_state_bytes"]
    mem = pd.read_csv(tmp_path / "memory.csv")
    assert mem.to_dict("records") == [{"epoch": e, **w} for e in (1, 2) for w in per]
    assert scalars(records[0]) == {"epoch": 1, "train_loss": 1.0, "model_state_bytes": 20}
    assert worker_rows([{"epoch": 1}]) == []
    assert all(documented(k) for k in (*records[0], "optimizer_state_bytes", "peak_gpu_bytes"))


SMALL = {"data": "synthetic", "samples": 200, "hidden": [32, 16], "epochs": 1, "batch_size": 50}


def test_a_local_run_records_its_memory_as_predicted(tmp_path):
    spec = RunSpec.from_dict({**SMALL, "out": str(tmp_path / "run")})
    result = train(spec, report=lambda rec: None)
    rec = result.metrics[0]
    # synthetic: 8 features -> 32 -> 16 -> 1 logit, float32
    params = 4 * (8 * 32 + 32 + 32 * 16 + 16 + 16 + 1)
    assert rec["model_state_bytes"] == 4 * params + 4 * 6  # + Adam's six step counts
    assert rec["per_worker_memory"][0]["worker"] == "rank 0"
    data, model, _ = setup(spec)
    sizes = footprint.sizes_of(model, spec.model, spec.optimizer, data.x_train[:1])
    [w] = get("local").cost.worker_bytes(sizes, footprint.Layout.of(spec))
    assert abs(w.state - rec["model_state_bytes"]) <= 0.1 * rec["model_state_bytes"]
    assert pd.read_csv(tmp_path / "run" / "memory.csv")["worker"].tolist() == ["rank 0"]


# --- predictions by hand --------------------------------------------------------------------

# four blocks of 100 MB of parameters, Adam (2x state), outputs 1 kB per sample, the two middle
# blocks' parameters all in linear layers tensor parallelism splits
SIZES = footprint.Sizes(params=[100e6] * 4, state=[200e6] * 4, out=[1000] * 4,
                        sharded=[0, 100e6, 100e6, 0], tensors=((150e6, 300e6), (100e6, 200e6),
                                                               (100e6, 200e6), (50e6, 100e6)))


def test_footprints_by_hand():
    lay = footprint.Layout(n=4, batch=64, microbatches=4, schedule="gpipe")
    one = lambda strategy, layout=lay: get(strategy).cost.worker_bytes(SIZES, layout)  # noqa: E731
    # P = 400 MB: P + G + 2P = 1.6 GB; activations 16 samples x 4 kB
    assert [(w.state, w.activations) for w in one("ddp")] == [(1.6e9, 16 * 4000)]
    zero1 = footprint.Layout(n=4, batch=64, shard_optimizer=True)
    assert one("ddp", zero1)[0].state == 800e6 + 800e6 / 4
    # fsdp: 1.6 GB / 4 + 3/4 of the largest block (100 MB) gathered
    assert one("fsdp")[0].state == pytest.approx(400e6 + 75e6)
    # tp: the middle blocks (800 MB of P + G + O) split in 4, the outer 800 MB whole
    assert one("tp")[0].state == pytest.approx(800e6 + 200e6)
    assert one("tp")[0].activations == 64 * 4000
    # ps, 2 servers: largest tensor first onto the least loaded: {150, 50} and {100, 100} MB
    replica, *servers = one("ps", footprint.Layout(n=4, batch=64, servers=2))
    assert replica.state == 800e6 and [s.state for s in servers] == [600e6, 600e6]
    # pipeline, 4 stages of one block each; GPipe holds all 4 micro-batches of 16 samples
    stages = one("pipeline")
    assert [s.state for s in stages] == [400e6] * 4
    assert [s.activations for s in stages] == [4 * 16 * 1000] * 4
    # 1F1B: stage k holds at most K - k
    f1b = one("pipeline", footprint.Layout(n=4, batch=64, microbatches=8, schedule="1f1b"))
    assert [s.activations for s in f1b] == [k * 8 * 1000 for k in (4, 3, 2, 1)]
    assert one("pipeline", footprint.Layout(n=5, batch=64)) == []  # 4 blocks make no 5 stages


def test_the_pre_flight_refuses_a_strategy_that_does_not_fit(tmp_path, capsys):
    """mlp 8 -> 32 -> 16 -> 1 under Adam: 833 parameters, 3,332 bytes; all four copies 13,328."""
    out = tmp_path / "run"
    args = ["train", "--data", "synthetic", "--samples", "200", "--hidden", "32,16", "--out", str(out)]
    assert main([*args, "--strategy", "ps", "--set", "memory_per_worker=8KB"]) == 2
    err = capsys.readouterr().err
    # a replica: weights + gradients 6,664 bytes; the one server: weights + Adam's m, v 9,996
    assert err == ("error: memory_per_worker: ps needs 9.8 KiB per worker (a replica's parameters "
                   "and gradients, or a server's share with adam state), budget 7.8 KiB; fsdp, tp or "
                   "pipeline shard it\n")
    assert main([*args, "--set", "memory_per_worker=12KiB"]) == 2
    assert capsys.readouterr().err == (
        "error: memory_per_worker: local needs 13.0 KiB per worker (parameters, gradients and adam "
        "state), budget 12.0 KiB; fsdp, tp or pipeline shard it\n")
    # 2 stages: 8 -> 32 (1,152 bytes) | 32 -> 16 -> 1 (2,180 bytes): 4 x 2,180 = 8,720 = 8.5 KiB
    assert main([*args, "--strategy", "pipeline", "--set", "memory_per_worker=8KiB"]) == 2
    assert capsys.readouterr().err == (
        "error: memory_per_worker: pipeline needs 8.5 KiB per worker (a stage's parameters, "
        "gradients and adam state), budget 8.0 KiB; more stages shard it further\n")
    assert not out.exists()
