"""`pipeline`: stages as Ray actors, micro-batches under GPipe and 1F1B. It ends where `local`
ends, holds the activations each schedule promises, survives a dead stage bit for bit, and
refuses settings that cannot work with a message that says why."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from pipeline_runs import assert_same_as_local, quiet, run_once
from resmlp import make_model  # examples/resmlp, on sys.path (tests/conftest.py)

from raydist.cli import main
from raydist.config import ConfigError, RunSpec
from raydist.data import load_data
from raydist.engine import Diverged, global_batches
from raydist.engine.record import documented
from raydist.models import build_model
from raydist.runtime.faults import MARKER
from raydist.strategies.pipeline import StageFailed
from raydist.strategies.pipeline.cuts import balanced_cuts, blocks_of, boundary_shapes, stage_bounds
from raydist.strategies.pipeline.schedules import gpipe, one_f_one_b
from raydist.train import train

# digits: 1438 training samples; 50 = 13+13+12+12 leaves micro-batches of unequal size
MLP = {"model": "mlp", "data": "digits", "optimizer": "adam", "epochs": 2, "batch_size": 50}
# Not Adam here: the attention key bias has a gradient that is zero but for round-off (softmax
# ignores a shift shared by all keys), and Adam scales any round-off up to a full lr step. Even
# plain torch, summing micro-batch gradients, then ends 6e-4 from the full batch.
TINY_TEXT = {"model": "transformer", "data": "text", "optimizer": "momentum", "layers": 2,
             "d_model": 32, "seq_len": 16, "text_chars": 5000, "epochs": 2, "batch_size": 40}
BASES = {"mlp": MLP, "text": TINY_TEXT}
RUNS = {
    "mlp-gpipe": {"schedule": "gpipe", "stages": 2, "microbatches": 4},
    "mlp-1f1b": {"schedule": "1f1b", "stages": 2, "microbatches": 4},
    # 4 blocks (embed, block0, block1, head): explicit cuts into 3 stages, and a balanced cut
    "text-1f1b": {"schedule": "1f1b", "stages": 3, "cuts": [1, 3], "microbatches": 4},
    "text-gpipe": {"schedule": "gpipe", "stages": 2, "microbatches": 3},
}



def pipeline_raw(name: str) -> dict:
    return {**BASES[name.split("-")[0]], **RUNS[name], "strategy": "pipeline"}


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    """runs(name) -> (pipeline result, pipeline spec, local result); runs("mlp") -> local's
    result. Each run happens once per module."""
    once = run_once(tmp_path_factory)

    def get(name: str):
        base = name.split("-")[0]
        reference = once(base, BASES[base])[0]
        if name == base:
            return reference
        return (*once(name, pipeline_raw(name)), reference)

    return get


# --- the plan: cuts and schedules -----------------------------------------------------------------

@pytest.mark.unit
def test_balanced_cuts_minimise_the_largest_stage():
    assert balanced_cuts([10, 10, 10, 10], 2) == [2]
    assert balanced_cuts([100, 1, 1, 100], 2) == [2]
    assert balanced_cuts([1, 1, 1, 100], 2) == [3]
    assert balanced_cuts([5, 5, 10], 3) == [1, 2]
    assert balanced_cuts([0, 30, 10, 10, 10], 3) == [2, 3]


@pytest.mark.unit
def test_schedules_order_each_stages_ops():
    f = [("F", i, 0) for i in range(3)]
    b = [("B", i, 0) for i in range(3)]
    assert gpipe(0, 2, 3) == gpipe(1, 2, 3) == f + b
    # 1F1B: stage k warms up with K-k-1 forwards, then alternates
    assert one_f_one_b(0, 3, 3) == [f[0], f[1], f[2], b[0], b[1], b[2]]
    assert one_f_one_b(1, 3, 3) == [f[0], f[1], b[0], f[2], b[1], b[2]]
    assert one_f_one_b(2, 3, 3) == [f[0], b[0], f[1], b[1], f[2], b[2]]
    assert one_f_one_b(0, 4, 2) == f[:2] + b[:2]  # fewer micro-batches than stages


@pytest.mark.unit
def test_a_stage_knows_its_parameters_by_the_models_own_names():
    """What spawn gives each stage for muon's split: a user's pipeline_blocks() number the
    blocks 0, 1, ..., the model names them inp, blocks.0, ..."""
    model = make_model(SimpleNamespace(n_features=8, out_dim=3), width=4, depth=2)
    own = {id(p): n for n, p in model.named_parameters()}
    blocks = blocks_of(model, "resmlp:make_model")
    for layers in (blocks.seq[:2], blocks.seq[2:]):
        assert [blocks.model_key(n) for n, _ in layers.named_parameters()] == \
            [own[id(p)] for p in layers.parameters()]
    assert blocks.model_key("3.weight") == "out.weight"


# --- bad settings -----------------------------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.parametrize("raw,message", [
    ({"stages": 3}, "stages: got 3, but model 'mlp' has only 2 blocks; expected at most 2"),
    ({"microbatches": 65, "batch_size": 64},
     "microbatches: got 65, more than the global batch of 64 samples; expected at most 64"),
    ({"optimizer": "gd", "microbatches": 2000},  # gd's global batch is the whole training set
     "microbatches: got 2000, more than the global batch of 1438 samples; expected at most 1438"),
    ({"hidden": [64, 32], "stages": 3, "cuts": [1]},
     "cuts: got [1]; expected 2 block indices (stages - 1) for stages=3"),
    ({"hidden": [64, 32], "stages": 3, "cuts": [2, 1]},
     "cuts: got [2, 1]; expected strictly increasing block indices"),
    ({"hidden": [64, 32], "stages": 3, "cuts": [1, 1]},
     "cuts: got [1, 1]; expected strictly increasing block indices"),
    ({"hidden": [64, 32], "stages": 2, "cuts": [3]},
     "cuts: got [3]; expected block indices from 1 to 2 (model 'mlp' has 3 blocks)"),
    ({"stages": 2, "threads_per_worker": 3},  # the fixture's Ray has 4 CPUs
     "pipeline (2 stages x 3 threads) needs 6 CPUs but the cluster can provide at most 4"),
    ({"stages": 2, "use_gpu": True},  # and none has GPUs
     "pipeline (2 stages x 1 threads) needs 2 GPUs but the cluster can provide at most 0"),
])
def test_bad_settings_fail_before_training_with_a_clear_message(raw, message, ray_local, tmp_path):
    out = tmp_path / "never"
    spec = RunSpec.from_dict({"strategy": "pipeline", "epochs": 1, "out": str(out), **raw})
    with pytest.raises(ConfigError) as err:
        train(spec, quiet)
    assert str(err.value) == message
    assert not out.exists()


# --- equal to local -------------------------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.parametrize("name", ["mlp-gpipe", "text-1f1b", "text-gpipe"])
def test_ends_equal_to_local(name, runs):
    result, _, reference = runs(name)
    assert_same_as_local(result, reference)


@pytest.mark.ray
@pytest.mark.parametrize("optimizer", ["muon", "lamb", "adafactor", "lion", "schedule-free-adamw"])
def test_newer_optimizers_end_equal_to_local(optimizer, ray_local, tmp_path):
    """Each stage steps its own block (muon: stage 0 the hidden matrix and its bias, stage 1 the
    head, all AdamW's); schedule-free's stages evaluate and save x, as local does."""
    raw = {**MLP, "optimizer": optimizer}
    reference = train(RunSpec.from_dict({**raw, "out": str(tmp_path / "local")}), quiet)
    spec = RunSpec.from_dict({**raw, **RUNS["mlp-gpipe"], "strategy": "pipeline",
                              "out": str(tmp_path / "pp")})
    assert_same_as_local(train(spec, quiet), reference)


@pytest.mark.ray
def test_cli_train_writes_the_outputs_of_local(runs, tmp_path):
    reference = runs("mlp")
    raw = pipeline_raw("mlp-1f1b")
    argv = ["train", "--out", str(tmp_path)]
    for key, value in raw.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "machine.yaml", "memory.csv",
                                                          "metrics.csv", "model.pt", "ray.log", "spec.yaml",
                                                          "stage_events.json"]
    model = torch.load(tmp_path / "model.pt")
    assert list(model) == list(reference.state_dict)
    assert max((model[k] - v).abs().max().item() for k, v in reference.state_dict.items()) <= 1e-5
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2]
    # 1F1B on 2 stages: the first stage holds 2 micro-batches at most, the last one 1
    assert metrics["stage0_peak_activations"].tolist() == [2, 2]
    assert metrics["stage1_peak_activations"].tolist() == [1, 1]


# --- what each schedule holds, and what it reports --------------------------------------------------

@pytest.mark.ray
def test_1f1b_holds_at_most_stages_activations_gpipe_holds_all_microbatches(runs):
    def peaks(name):
        result, spec, _ = runs(name)
        return [[rec[f"stage{k}_peak_activations"] for k in range(spec.stages)] for rec in result.metrics]

    assert peaks("mlp-gpipe") == [[4, 4]] * 2  # M = 4
    assert peaks("text-gpipe") == [[3, 3]] * 2  # M = 3
    assert peaks("text-1f1b") == [[3, 2, 1]] * 2  # K = 3 < M = 4: stage k holds K - k


@pytest.mark.ray
@pytest.mark.parametrize("name", ["mlp-gpipe", "text-1f1b"])
def test_each_epoch_reports_bubble_and_stage_times(name, runs):
    result, spec, _ = runs(name)
    k, m = spec.stages, spec.microbatches
    for rec in result.metrics:
        assert rec["bubble_bound"] == (k - 1) / (m + k - 1)
        # the bubble is what the stages' own timers leave idle of the epoch's steps (not
        # clamped): each stage computes within them, and with K >= 2 the later stages must wait
        # to start. The steps last at least as long as the busiest stage's compute and comm,
        # and at most epoch_time_s (which also holds the collection of the stages' statistics),
        # so the bubble lies between the idle shares over those two spans.
        compute = [rec[f"stage{i}_compute_s"] for i in range(k)]
        busy = [rec[f"stage{i}_compute_s"] + rec[f"stage{i}_comm_s"] for i in range(k)]
        assert all(rec[f"stage{i}_compute_s"] > 0 and rec[f"stage{i}_comm_s"] > 0 for i in range(k))
        assert max(busy) <= rec["epoch_time_s"]
        idle = 1 - sum(compute) / (k * rec["epoch_time_s"])
        assert 1 - sum(compute) / (k * max(busy)) <= rec["bubble_fraction"] <= idle
        assert 0 < rec["bubble_fraction"] < 1
        # one meaning for every strategy: the stages' mean wait on their neighbours
        assert rec["comm_wait_s"] == pytest.approx(sum(rec[f"stage{i}_comm_s"] for i in range(k)) / k)
        assert rec["world_size"] == k and all(documented(key) for key in rec)
    # bytes as sent: every sample's activations forward and their gradients back, over each cut
    data = load_data(spec)
    model = build_model(spec, data)
    shapes = boundary_shapes(model, data.x_train[:1], stage_bounds(spec, model))[1:]
    steps = len(global_batches(spec, data, 1))
    per_sample = sum(2 * math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
                     for shape, dtype in shapes)
    assert all(rec["bytes_per_step"] == data.n_train * per_sample / steps for rec in result.metrics)


# --- a stage dies ---------------------------------------------------------------------------------

@pytest.mark.ray
def test_dead_stage_is_restarted_from_the_checkpoint_and_ends_bit_identical(runs, tmp_path,
                                                                          monkeypatch):
    _, uninterrupted, _ = runs("mlp-gpipe")
    monkeypatch.setenv("RAYDIST_FAULT", "1:2")  # stage 1 exits in epoch 2
    spec = uninterrupted.replace(out=str(tmp_path), max_failures=1)
    reported = []
    train(spec, reported.append)
    assert (tmp_path / MARKER).exists()  # it did die
    assert [rec["epoch"] for rec in reported] == [1, 2]  # epoch 1 came from the checkpoint, once
    assert (tmp_path / "model.pt").read_bytes() == (Path(uninterrupted.out) / "model.pt").read_bytes()


@pytest.mark.ray
def test_a_second_invocation_continues_from_the_checkpoint_of_the_first(runs, tmp_path):
    _, two_epochs, _ = runs("mlp-gpipe")
    first = two_epochs.replace(out=str(tmp_path), epochs=1)
    train(first, quiet)
    reported = []
    train(first.replace(epochs=2), reported.append)
    assert [rec["epoch"] for rec in reported] == [2]
    assert pd.read_csv(tmp_path / "metrics.csv")["epoch"].tolist() == [1, 2]
    assert (tmp_path / "model.pt").read_bytes() == (Path(two_epochs.out) / "model.pt").read_bytes()
    with pytest.raises(ConfigError) as err:
        train(first.replace(epochs=3, lr=0.5), quiet)
    assert str(err.value) == (
        f"lr: got 0.5, but {tmp_path} holds a pipeline run with lr={two_epochs.lr!r}; resume it with "
        "the same settings (only epochs, out, address, max_failures, stall_timeout_s, "
        "threads_per_worker, memory_per_worker, use_gpu, replicas, timeline_step may change) or "
        "choose another out")


@pytest.mark.ray
def test_a_diverged_run_leaves_no_checkpoint_of_the_diverged_epoch(ray_local, tmp_path):
    spec = RunSpec.from_dict({**MLP, "epochs": 2, "strategy": "pipeline", "optimizer": "sgd",
                              "lr": 1e20, "out": str(tmp_path)})
    reports = []
    with pytest.raises(Diverged, match=r"^training loss is (nan|inf) at epoch 1$"):
        train(spec, reports.append)
    assert [r["epoch"] for r in reports] == [1]  # reported, with its non-finite loss
    assert pd.read_csv(tmp_path / "metrics.csv")["epoch"].tolist() == [1]  # kept on disk
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "model.pt").exists()


@pytest.mark.ray
def test_dead_stage_beyond_max_failures_stops_the_run(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDIST_FAULT", "0:1")
    spec = RunSpec.from_dict({**MLP, "epochs": 1, "strategy": "pipeline", "stages": 1,
                              "out": str(tmp_path)})
    with pytest.raises(StageFailed, match=r"^pipeline: an actor died \(ActorDiedError\) and "
                                          r"max_failures=0 restarts are used up$"):
        train(spec, quiet)
