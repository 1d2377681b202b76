"""`raydist report`'s pipeline timeline from a trial's recorded step (hand-made here): the Chrome
trace holds every op of every stage actor in microseconds, the PNG is written, and the measured
bubble is the share of the actors' time in the step not computing, worked out by hand."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from raydist import report
from raydist.report import timeline
from raydist.strategies.pipeline import events

pytestmark = pytest.mark.unit

PNG = b"\x89PNG\r\n\x1a\n"

# 1F1B on 2 stages, M = 2, in seconds: stage 1 waits 1 s for each activation
STEP = {"epoch": 1, "step": 2, "schedule": "1f1b", "stages": 2, "replicas": 1, "chunks": 1,
        "microbatches": 2, "actors": [
            {"replica": 0, "stage": 0, "events": [
                ["F", 0, 0, 0.0, 1.0], ["send", 0, 0, 1.0, 1.0], ["F", 1, 0, 1.0, 2.0],
                ["send", 1, 0, 2.0, 2.0], ["recv", 0, 0, 2.0, 4.0], ["B", 0, 0, 4.0, 5.0],
                ["recv", 1, 0, 5.0, 6.5], ["B", 1, 0, 6.5, 7.5], ["step", -1, -1, 7.5, 8.0]]},
            {"replica": 0, "stage": 1, "events": [
                ["recv", 0, 0, 0.0, 1.0], ["F", 0, 0, 1.0, 2.0], ["B", 0, 0, 2.0, 4.0],
                ["send", 0, 0, 4.0, 4.0], ["recv", 1, 0, 4.0, 4.0], ["F", 1, 0, 4.0, 5.0],
                ["B", 1, 0, 5.0, 6.5], ["send", 1, 0, 6.5, 6.5], ["sends", -1, -1, 6.5, 7.0],
                ["step", -1, -1, 7.0, 8.0]]}]}


def sweep(tmp_path, recorded: bool):
    rows = [{"trial_id": t, "status": "completed", "epoch": e, "train_loss": 1.0, "val_loss": 1.0,
             "val_accuracy": 0.5, "samples_per_s": 100.0, "epoch_time_s": 1.0, "wall_time_s": e,
             "strategy": "pipeline", "optimizer": "adam", "lr": 0.01, "stages": 2, "seed": 0,
             "schedule": s} for t, s in (("t1", "1f1b"), ("t2", "gpipe")) for e in (1, 2)]
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    (tmp_path / "sweep.yaml").write_text("model: mlp\nsweep: {metric: val_accuracy, mode: max}\n")
    for t in ("t1", "t2"):
        (tmp_path / "trials" / t).mkdir(parents=True)
    if recorded:
        (tmp_path / "trials" / "t1" / events.EVENTS).write_text(json.dumps(STEP))
    return tmp_path


def test_report_writes_the_timeline_of_a_pipeline_sweep(tmp_path):
    root = sweep(tmp_path, recorded=True)
    text = report.write(root).read_text()
    assert "## Pipeline timeline" in text and "![timeline](timeline.png)" in text
    assert (root / "timeline.png").read_bytes().startswith(PNG)
    trace = json.loads((root / "timeline.json").read_text())["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in trace if e["name"] == "thread_name"}
    assert names == {0: "replica 0 stage 0", 1: "replica 0 stage 1"}
    ops = {tid: [e["name"] for e in trace if e["ph"] == "X" and e["tid"] == tid and e["cat"] in "FBW"]
           for tid in names}
    assert ops == {0: ["F0", "F1", "B0", "B1"], 1: ["F0", "B0", "F1", "B1"]}
    b1 = next(e for e in trace if e["ph"] == "X" and e["tid"] == 1 and e["name"] == "B1")
    assert (b1["ts"], b1["dur"]) == (5e6, 1.5e6)
    assert sum(e["ph"] == "X" for e in trace) == 19


def test_no_timeline_without_a_recorded_step(tmp_path):
    root = sweep(tmp_path, recorded=False)
    assert "Pipeline timeline" not in report.write(root).read_text()
    assert not (root / "timeline.png").exists() and not (root / "timeline.json").exists()


def test_measured_bubble_by_hand():
    # computing: stage 0 1+1+1+1+0.5 = 4.5 s, stage 1 1+2+1+1.5+1 = 6.5 s; 2 actors x 8 s
    assert timeline.measured_bubble(STEP) == pytest.approx(1 - 11 / 16)
