"""`pipeline` as people run it: interleaved 1F1B (V chunks per actor), ZB-H1 (split backward),
and R replicas of the pipeline (DP x PP). Each ends where `local` ends, on an mlp of 4 blocks
and on gpt; replicas resume and restart as one pipeline does; the recorded step shows each
stage's ops in its schedule's order."""

from __future__ import annotations

import itertools
from pathlib import Path

import pandas as pd
import pytest
import torch
from pipeline_runs import assert_same_as_local, max_diff, quiet, run_once

from raydist.config import RunSpec
from raydist.runtime.faults import MARKER
from raydist.strategies.pipeline import events
from raydist.train import train

# 4 blocks (fc0, fc1, fc2, head): 2 stages x 2 chunks. digits: 1438 training samples; 50 leaves
# micro-batches of unequal size and a short last batch of 38
MLP4 = {"model": "mlp", "data": "digits", "hidden": [16, 16, 16], "optimizer": "adam", "epochs": 2,
        "batch_size": 50}
# 4 blocks (embed, block0, block1, head). Momentum, not Adam: see TINY_TEXT in test_pipeline.py
GPT = {"model": "gpt", "data": "text", "optimizer": "momentum", "layers": 2, "d_model": 32,
       "heads": 2, "seq_len": 16, "text_chars": 5000, "epochs": 2, "batch_size": 40}
BASES = {"mlp": MLP4, "gpt": GPT}
RUNS = {
    "interleaved": {"schedule": "interleaved-1f1b", "stages": 2, "microbatches": 4},
    "replicas": {"schedule": "1f1b", "stages": 2, "replicas": 2, "microbatches": 2},
    "zb": {"schedule": "zb-h1", "stages": 2, "microbatches": 4},
}



@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    """runs("mlp-interleaved") -> (pipeline result, its spec, local's result), each run once."""
    once = run_once(tmp_path_factory)

    def get(name: str):
        base, run = name.split("-")
        reference = once(base, BASES[base])[0]
        return (*once(name, {**BASES[base], **RUNS[run], "strategy": "pipeline"}), reference)

    return get


@pytest.mark.ray
@pytest.mark.parametrize("name", ["mlp-interleaved", "gpt-interleaved", "mlp-replicas", "gpt-replicas",
                                  "mlp-zb"])
def test_ends_equal_to_local(name, runs):
    result, _, reference = runs(name)
    assert_same_as_local(result, reference)


@pytest.mark.ray
def test_interleaved_reports_its_bound_and_holds_chunks(runs):
    result, _, _ = runs("mlp-interleaved")
    for rec in result.metrics:
        assert rec["bubble_bound"] == 1 / 9  # (K-1)/(V*M + K-1), K = 2, V = 2, M = 4
        assert 0 < rec["bubble_fraction"] < 1
        assert rec["world_size"] == 2
        # Megatron's warm-up: stage 0 runs 2(K-1) + (V-1)K = 4 forwards before its first backward
        assert rec["stage0_peak_activations"] == 5 and rec["stage1_peak_activations"] == 3


@pytest.mark.ray
def test_replicas_report_every_actor(runs):
    result, spec, _ = runs("mlp-replicas")
    for rec in result.metrics:
        assert rec["world_size"] == 4  # 2 replicas x 2 stages
        assert rec["stage0_peak_activations"] == 2 and rec["stage1_peak_activations"] == 1


@pytest.mark.ray
def test_recorded_step_shows_1f1b_order(runs):
    """The events of one step (timeline_step, by default the second): on 2 stages with M = 4,
    each stage ran 8 ops, in 1F1B's order, one after the other, each forward of stage 1 after
    its input arrived."""
    _, spec, _ = runs("mlp-replicas")
    rec = events.read(Path(spec.out) / events.EVENTS)
    assert (rec["step"], rec["epoch"], rec["stages"], rec["replicas"], rec["microbatches"]) == (2, 1, 2, 2, 2)
    assert [(a["replica"], a["stage"]) for a in rec["actors"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    f = [("F", i, 0) for i in range(2)]
    b = [("B", i, 0) for i in range(2)]
    expected = {0: [f[0], f[1], b[0], b[1]], 1: [f[0], b[0], f[1], b[1]]}
    for actor in rec["actors"]:
        assert events.compute_ops(actor) == expected[actor["stage"]]
        spans = sorted((s, e) for *_, s, e in actor["events"])
        assert all(e0 <= s1 for (_, e0), (s1, _) in itertools.pairwise(spans))  # one op at a time
        kinds = {k for k, *_ in actor["events"]}
        assert {"recv", "send", "sends", "allreduce", "step"} <= kinds


@pytest.mark.ray
def test_1f1b_with_four_microbatches_records_eight_ops_per_stage(ray_local, tmp_path):
    spec = RunSpec.from_dict({**MLP4, "epochs": 1, "strategy": "pipeline", "schedule": "1f1b",
                              "stages": 2, "microbatches": 4, "timeline_step": 3, "out": str(tmp_path)})
    train(spec, quiet)
    rec = events.read(tmp_path / events.EVENTS)
    assert rec["step"] == 3 and rec["microbatches"] == 4
    f = [("F", i, 0) for i in range(4)]
    b = [("B", i, 0) for i in range(4)]
    stage0 = [f[0], f[1], b[0], f[2], b[1], f[3], b[2], b[3]]
    stage1 = [f[0], b[0], f[1], b[1], f[2], b[2], f[3], b[3]]
    assert [events.compute_ops(a) for a in rec["actors"]] == [stage0, stage1]
    # stage 1 receives each activation before it runs that micro-batch's forward
    got = {(k, mb): (s, e) for k, mb, _, s, e in rec["actors"][1]["events"] if k in ("recv", "F")}
    assert all(got[("recv", i)][1] <= got[("F", i)][0] for i in range(4))


@pytest.mark.ray
def test_replicas_restart_from_the_checkpoint_bit_identical(runs, tmp_path, monkeypatch):
    _, uninterrupted, _ = runs("mlp-replicas")
    monkeypatch.setenv("RAYDIST_FAULT", "3:2")  # replica 1's stage 1 exits in epoch 2
    reported = []
    train(uninterrupted.replace(out=str(tmp_path), max_failures=1), reported.append)
    assert (tmp_path / MARKER).exists()
    assert [rec["epoch"] for rec in reported] == [1, 2]
    assert (tmp_path / "model.pt").read_bytes() == (Path(uninterrupted.out) / "model.pt").read_bytes()


@pytest.mark.ray
def test_a_resumed_run_may_change_its_replicas(runs, tmp_path):
    """replicas is resumable: a run of 2 replicas continued by 1 still ends where local does."""
    _, two, reference = runs("mlp-replicas")
    train(two.replace(out=str(tmp_path), epochs=1), quiet)
    reported = []
    train(two.replace(out=str(tmp_path), replicas=1), reported.append)
    assert [rec["epoch"] for rec in reported] == [2]
    assert pd.read_csv(tmp_path / "metrics.csv")["world_size"].tolist() == [4, 2]
    assert max_diff(torch.load(tmp_path / "model.pt"), reference.state_dict) <= 1e-5
