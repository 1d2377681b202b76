"""The cost model's formulas on hand-computed numbers, its calibration, and the `raydist plan`
command. How its predictions compare with step times measured on this machine is
bench/plan_check.py's job: it measures both and prints them side by side."""

from __future__ import annotations

import math

import pytest

from raydist.config import ConfigError, RunSpec
from raydist.memory.footprint import Layout, Sizes
from raydist.plan import (
    Network,
    compute,
    mark,
    parse_bandwidth,
    parse_duration,
    parse_rate,
    predict,
    recommend,
    recommendation,
    slowdown,
)
from raydist.plan.calibration import Costs, calibrate, from_flops
from raydist.strategies.ddp.cost import predicted_step as ddp_step
from raydist.strategies.fsdp.cost import predicted_step as fsdp_step
from raydist.strategies.pipeline.cost import predicted_step as pipeline_step
from raydist.strategies.ps.cost import predicted_step as ps_step
from raydist.strategies.tp.cost import predicted_step as tp_step

pytestmark = pytest.mark.unit

# compute(b) measured at 64, 128, 256 samples; 2 workers per node, each 1.5x slower when both
# compute; three blocks: 60/30/10 % of the time, 400/300/300 parameters
COSTS = Costs(batches=[64, 128, 256], step_s=[0.02, 0.03, 0.05], optimizer_s=0.002,
              workers_per_node=2, concurrency=[1, 2], slowdown=[1.0, 1.5], grad_bytes=8_000_000,
              block_share=[0.6, 0.3, 0.1], block_params=[400, 300, 300],
              block_out_bytes=[1000, 500, 4])
NET = Network(bandwidth=1e9, latency=1e-5)


def test_units():
    assert parse_bandwidth("25Gbit/s") == 25e9 / 8
    assert parse_bandwidth("3GB/s") == 3e9
    assert parse_bandwidth("100Mbit/s") == 12.5e6
    assert parse_duration("10us") == pytest.approx(1e-5)
    assert parse_duration("2ms") == pytest.approx(2e-3)
    with pytest.raises(ConfigError, match=r"^bandwidth: got 'fast'; expected a rate like 25Gbit/s or 3GB/s$"):
        parse_bandwidth("fast")
    with pytest.raises(ConfigError, match=r"^latency: got '3'; expected a time like 10us or 2ms$"):
        parse_duration("3")
    assert parse_rate("2TFLOP/s") == 2e12
    assert parse_rate("500GFLOPS") == 5e11
    assert parse_rate("2e12") == 2e12
    with pytest.raises(ConfigError, match=r"^flops: got 'fast'; expected a rate like 2TFLOP/s or 2e12$"):
        parse_rate("fast")


def test_compute_is_linear_between_the_measured_batch_sizes():
    assert compute(COSTS, 128) == pytest.approx(0.03)
    assert compute(COSTS, 96) == pytest.approx(0.025)
    assert compute(COSTS, 512) == pytest.approx(0.05 + 0.02 / 128 * 256)  # along the last segment
    assert compute(COSTS, 32) == pytest.approx(0.015)  # along the first
    assert compute(Costs(**{**vars(COSTS), "batches": [64], "step_s": [0.02]}), 32) == pytest.approx(0.01)


def test_ddp_ring_allreduce_on_slowed_workers():
    assert ddp_step(COSTS, NET, 256, 1) == pytest.approx(0.05)
    # compute(128) * 1.5 + S / B + 2 alpha
    assert ddp_step(COSTS, NET, 256, 2) == pytest.approx(0.045 + 0.008 + 2e-5)
    # 4 workers, 2 per node: slowdown of 2; ring 2(N-1)/N * S/B + 2(N-1) * alpha
    assert ddp_step(COSTS, NET, 256, 4) == pytest.approx(0.03 + 2 * 3 / 4 * 0.008 + 6e-5)


def test_parameter_server_replicas_compute_servers_step_link_carries_gradients_and_weights():
    # (compute(b) - opt) * slowdown + opt / servers + 2 alpha + (N + nodes) * S / (servers * B)
    assert ps_step(COSTS, NET, 256, 1) == pytest.approx(0.048 + 0.002 + 2e-5 + 2 * 0.008)
    assert ps_step(COSTS, NET, 256, 2) == pytest.approx(0.028 * 1.5 + 0.002 + 2e-5 + 3 * 0.008)
    assert ps_step(COSTS, NET, 256, 4) == pytest.approx(0.018 * 1.5 + 0.002 + 2e-5 + 6 * 0.008)
    assert ps_step(COSTS, NET, 256, 2, servers=2) == pytest.approx(0.042 + 0.001 + 2e-5 + 0.012)


def test_pipeline_fill_drain_slowest_stage_and_its_messages_flush():
    # M = 4 micro-batches of 64: (compute(64) - opt) = 0.018 per micro-batch on one stage
    assert pipeline_step(COSTS, NET, 256, 1, 4) == pytest.approx(4 * 0.018 + 0.002)
    # 2 stages cut after block 0 (400 | 600 parameters): 60 % and 40 % of the time; 1/0.6 stages
    # busy on average: slowdown 1 + 0.5 * (1/0.6 - 1) = 4/3
    t = [0.6 * 0.024, 0.4 * 0.024]
    hop = 1e-5 + 64 * 1000 / 1e9  # 64 samples' activations of block 0
    fill = 2 * hop
    expected = sum(t) + 3 * (t[0] + hop) + fill + 0.002 * 0.6
    assert pipeline_step(COSTS, NET, 256, 2, 4) == pytest.approx(expected)
    assert expected == pytest.approx(0.024 + 3 * 0.014474 + 0.000148 + 0.0012)
    # 3 stages: the first (60 %) still sets the pace; two cuts to fill and drain
    t = [0.6 * 0.024, 0.3 * 0.024, 0.1 * 0.024]
    hop2 = 1e-5 + 64 * 500 / 1e9
    expected = sum(t) + 3 * (t[0] + hop) + 2 * (hop + hop2) + 0.002 * 0.4
    assert pipeline_step(COSTS, NET, 256, 3, 4) == pytest.approx(expected)
    # a slow network: the middle stage, receiving over both cuts, sets the pace
    slow = Network(bandwidth=1e6, latency=1e-3)
    hop, hop2 = 1e-3 + 64 * 1000 / 1e6, 1e-3 + 64 * 500 / 1e6
    expected = sum(t) + 3 * (t[1] + hop + hop2) + 2 * (hop + hop2) + 0.002 * 0.4
    assert pipeline_step(COSTS, slow, 256, 3, 4) == pytest.approx(expected)
    assert math.isnan(pipeline_step(COSTS, NET, 256, 4, 4))  # 3 blocks cannot make 4 stages


def test_fsdp_gathers_and_scatters_the_parameters_tp_splits_the_middle_blocks():
    # compute(128) * 1.5 + 3 (N-1)/N S / B + 3 (N-1) alpha per block (3 blocks)
    assert fsdp_step(COSTS, NET, 256, 2) == pytest.approx(0.045 + 0.012 + 9e-5)
    assert fsdp_step(COSTS, NET, 256, 1) == pytest.approx(0.05)
    # compute(256) * 1.5 * (0.3 / 4 + 0.7), and 4 all-reduces of 256 x 500 bytes (block 1's output)
    ring = 2 * 3 / 4 * 256 * 500 / 1e9 + 6e-5
    assert tp_step(COSTS, NET, 256, 4) == pytest.approx(0.075 * 0.775 + 4 * ring)
    assert tp_step(COSTS, NET, 256, 1) == pytest.approx(0.05)


# COSTS' model in bytes: blocks of 4, 2 and 2 MB of parameters (S = 8 MB), under Adam (2x);
# outputs 1000, 500 and 4 bytes per sample; block 1 is split by tensor parallelism
PLANNED = Sizes(params=[4e6, 2e6, 2e6], state=[8e6, 4e6, 4e6], out=[1000, 500, 4],
                sharded=[0, 2e6, 0], tensors=((4e6, 8e6), (2e6, 4e6), (2e6, 4e6)))
STEP_4 = {"ddp": 0.03 + 2 * 3 / 4 * 0.008 + 6e-5,  # test_ddp_ring_allreduce_on_slowed_workers
          "fsdp": 0.03 + 3 * 3 / 4 * 0.008 + 3 * 3 * 1e-5 * 3}  # + 3 gathers: 3 (N-1) alpha x 3 blocks


def planned(budget: float) -> list[dict]:
    rows = predict(COSTS, NET, 256, [1, 2, 4], 4, memory=(PLANNED, Layout(n=1, batch=256, microbatches=4)))
    return mark(rows, budget)


def test_recommend_ddp_when_it_fits_and_wins():
    """40 MB per worker: ddp holds P + G + O = 32 MB and 64 samples x 1504 bytes of activations
    at N = 4, and its 42 ms step beats fsdp's 48 ms (its gathers cost 3/2 of ddp's ring)."""
    rows = planned(40e6)
    ddp4 = next(r for r in rows if (r["strategy"], r["workers"]) == ("ddp", 4))
    assert ddp4["state_bytes"] == 32e6 and ddp4["activation_bytes"] == 64 * 1504 and ddp4["fits"]
    best = recommend(rows)
    assert (best["strategy"], best["workers"]) == ("ddp", 4)
    assert best["step_s"] == pytest.approx(STEP_4["ddp"])
    assert recommendation(best, 40e6) == ("recommend: ddp on 4 workers: 42.06 ms per step, 30.6 MiB "
                                          "per worker (budget 38.1 MiB)")


def test_recommend_fsdp_when_only_fsdp_and_pipeline_fit():
    """20 MB per worker: ddp (32 MB), tp (24 MB replicated + 8/N MB split), ps (a server holds
    P + O = 24 MB) never fit; fsdp at N = 4 holds 32/4 + 3/4 x 4 MB gathered = 11 MB, at N = 2
    18 MB; a pipeline stage of 2 holds at most block 0's 16 MB and its activations (GPipe:
    4 micro-batches x 64 samples x 1000 bytes). fsdp on 4 is the fastest of those."""
    rows = planned(20e6)
    fit = {(r["strategy"], r["workers"]) for r in rows if r["fits"]}
    assert fit == {("fsdp", 2), ("fsdp", 4), ("pipeline", 2)}  # 3 blocks make no 4 stages
    fsdp4 = next(r for r in rows if (r["strategy"], r["workers"]) == ("fsdp", 4))
    assert fsdp4["state_bytes"] == pytest.approx(11e6)
    stage = next(r for r in rows if (r["strategy"], r["workers"]) == ("pipeline", 2))
    assert (stage["state_bytes"], stage["activation_bytes"]) == (16e6, 4 * 64 * 1000)
    best = recommend(rows)
    assert (best["strategy"], best["workers"]) == ("fsdp", 4)
    assert best["step_s"] == pytest.approx(STEP_4["fsdp"])
    assert recommend(planned(5e6)) is None
    assert recommendation(None, 5e6) == ("recommend: nothing fits (budget 4.8 MiB); more workers or "
                                         "stages, or a smaller model")


def test_predict_speedup_and_efficiency():
    rows = predict(COSTS, NET, 256, [1, 2, 4])
    assert {r["strategy"] for r in rows} == {"ddp", "fsdp", "tp", "ps", "pipeline"}
    one = [r for r in rows if r["workers"] == 1]
    assert all(r["speedup"] == 1.0 and r["efficiency"] == 1.0 for r in one)
    ddp4 = next(r for r in rows if r["strategy"] == "ddp" and r["workers"] == 4)
    assert ddp4["speedup"] == pytest.approx(ddp_step(COSTS, NET, 256, 1) / ddp_step(COSTS, NET, 256, 4))
    assert ddp4["efficiency"] == pytest.approx(ddp4["speedup"] / 4)


def test_calibrate_measures_every_batch_size_the_plan_needs():
    spec = RunSpec.from_dict({"data": "synthetic", "samples": 200, "hidden": [16, 8], "batch_size": 64,
                              "microbatches": 4, "threads_per_worker": 1})
    c = calibrate(spec, [1, 2, 8], workers_per_node=2, seconds=0.05)
    assert c.batches == [8, 16, 32, 64]  # B / N for N = 1, 2, 8 and the micro-batch B / 4
    assert len(c.step_s) == 4 and all(t > 0 for t in c.step_s)
    assert c.concurrency == [1, 2] and c.slowdown[0] == 1.0 and c.slowdown[1] > 0
    assert c.workers_per_node == 2
    assert c.block_params == [8 * 16 + 16, 16 * 8 + 8, 8 + 1]
    assert c.block_out_bytes == [16 * 4, 8 * 4, 4]
    assert c.grad_bytes == 4 * sum(c.block_params)
    assert sum(c.block_share) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match=r"^workers_per_node: got 0; expected an integer >= 1$"):
        calibrate(spec, [1, 2], workers_per_node=0)


def test_given_flops_count_the_step_instead_of_timing_it():
    """mlp 8 -> 16 -> 8 -> 1: a linear layer of i -> o does 2io operations per sample forward and
    as many for each gradient it computes backward (its weights'; its input's unless it is the
    first block, whose input needs none)."""
    spec = RunSpec.from_dict({"data": "synthetic", "samples": 200, "hidden": [16, 8], "batch_size": 64,
                              "microbatches": 4, "threads_per_worker": 1})
    c = from_flops(spec, 1e6, workers_per_node=2)
    flops = [4 * 8 * 16, 6 * 16 * 8, 6 * 8 * 1]
    assert c.step_s == [pytest.approx(sum(flops) / 1e6)] and c.batches == [1]
    assert compute(c, 64) == pytest.approx(64 * sum(flops) / 1e6)
    assert c.block_share == pytest.approx([f / sum(flops) for f in flops])
    assert c.optimizer_s == 0.0 and slowdown(c, 2) == 1.0 and slowdown(c, 1.5) == 1.0
    assert c.block_params == [8 * 16 + 16, 16 * 8 + 8, 8 + 1] and c.workers_per_node == 2
    with pytest.raises(ConfigError, match=r"^workers_per_node: got 0; expected an integer >= 1$"):
        from_flops(spec, 1e6, workers_per_node=0)


STRATEGIES = ("ddp", "fsdp", "tp", "ps", "pipeline")


def test_plan_command_takes_worker_counts_and_a_given_rate(tmp_path, capsys):
    from raydist.cli import main

    out = tmp_path / "plan"
    assert main(["plan", "--hidden", "32", "--batch-size", "64", "--workers", "1,2,4",
                 "--flops", "1GFLOP/s", "--out", str(out)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:16]]
    assert [r[:2] for r in rows] == [[s, n] for s in STRATEGIES for n in ("1", "2", "4")]
    # mlp 64 -> 32 -> 10 under Adam: 2,410 parameters, 4 x 9,640 bytes = 37.7 KiB for ddp
    assert main(["plan", "--hidden", "32", "--batch-size", "64", "--workers", "1,2,4",
                 "--flops", "1GFLOP/s", "--memory-per-worker", "30KiB", "--recommend",
                 "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-3:] == ["per", "worker", "fits"]
    table = {(r[0], int(r[1])): (float(r[2]), r[-1]) for r in (line.split() for line in lines[1:16])}
    assert [table["ddp", n][1] for n in (1, 2, 4)] == ["no", "no", "no"]
    # fsdp on 4: 37.7 / 4 KiB + 3/4 of block 0's 8,320 bytes gathered, and 16 samples' activations
    assert table["fsdp", 4][1] == "yes"
    fastest = min((t, key) for key, (t, fits) in table.items() if fits == "yes")[1]
    assert lines[16].startswith(f"recommend: {fastest[0]} on {fastest[1]} ")
    assert main(["plan", "--flops", "fast", "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err == "error: flops: got 'fast'; expected a rate like 2TFLOP/s or 2e12\n"


def test_plan_command_calibrates_prints_and_writes(tmp_path, capsys, monkeypatch):
    from raydist.cli import main
    from raydist.plan import calibration

    # Each batch size timed for 0.05 s, not the command's 1 s (4 sizes here): what is asserted
    # is the table and files the command makes of a calibration, not the times in them.
    real = calibration.calibrate
    monkeypatch.setattr(calibration, "calibrate", lambda *a, **kw: real(*a, **kw, seconds=0.05))
    out = tmp_path / "plan"
    assert main(["plan", "--hidden", "32", "--batch-size", "64", "--counts", "1,2,8",
                 "--bandwidth", "1Gbit/s", "--latency", "50us", "--workers-per-node", "1",
                 "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["strategy", "N", "step", "ms", "speedup", "efficiency", "per", "worker"]
    assert [line.split()[:2] for line in lines[1:16]] == [[s, n] for s in STRATEGIES for n in ("1", "2", "8")]
    assert (out / "plan.png").stat().st_size > 0
    assert len((out / "plan.csv").read_text().splitlines()) == 16


def test_plan_rejects_bad_counts(tmp_path, capsys):
    from raydist.cli import main

    assert main(["plan", "--counts", "0,2", "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err == "error: workers: got '0,2'; expected worker counts like 1,2,4,8\n"
