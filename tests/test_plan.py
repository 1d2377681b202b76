"""The cost model's formulas, on hand-computed numbers."""

from __future__ import annotations

import pytest

from raydist.config import ConfigError
from raydist.plan import (
    Costs,
    Network,
    ddp_step,
    parse_bandwidth,
    parse_duration,
    pipeline_step,
    predict,
    ps_step,
)

COSTS = Costs(fixed_s=0.01, per_sample_s=0.001, grad_bytes=8_000_000, activation_bytes=1000)
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


def test_ring_allreduce_alpha_beta():
    assert ddp_step(COSTS, NET, 256, 1) == pytest.approx(0.01 + 0.256)
    # 2(N-1)/N * S/B + 2(N-1) * alpha, with N = 4
    ring = 2 * 3 / 4 * 8e6 / 1e9 + 2 * 3 * 1e-5
    assert ddp_step(COSTS, NET, 256, 4) == pytest.approx(0.01 + 0.064 + ring)


def test_parameter_server_link_carries_every_replica():
    assert ps_step(COSTS, NET, 256, 2) == pytest.approx(0.01 + 0.128 + 2 * 2 * 8e6 / 1e9 + 2e-5)
    assert ps_step(COSTS, NET, 256, 2, servers=2) < ps_step(COSTS, NET, 256, 2)


def test_pipeline_pays_the_bubble():
    k, m = 2, 8
    slot = 0.001 * 256 / (m * k)
    hop = 2 * (1000 * 256 / m / 1e9 + 1e-5)
    assert pipeline_step(COSTS, NET, 256, k, m) == pytest.approx(0.01 + (m + k - 1) * (slot + hop))


def test_predict_speedup_and_efficiency():
    rows = predict(COSTS, NET, 256, [1, 2, 4])
    assert {r["strategy"] for r in rows} == {"ddp", "ps", "pipeline"}
    one = [r for r in rows if r["workers"] == 1]
    assert all(r["speedup"] == 1.0 and r["efficiency"] == 1.0 for r in one)
    ddp4 = next(r for r in rows if r["strategy"] == "ddp" and r["workers"] == 4)
    assert ddp4["speedup"] == pytest.approx(ddp_step(COSTS, NET, 256, 1) / ddp_step(COSTS, NET, 256, 4))
    assert ddp4["efficiency"] == pytest.approx(ddp4["speedup"] / 4)


def test_plan_command_calibrates_prints_and_writes(tmp_path, capsys):
    from raydist.cli import main

    out = tmp_path / "plan"
    assert main(["plan", "--hidden", "32", "--batch-size", "64", "--counts", "1,2,8",
                 "--bandwidth", "1Gbit/s", "--latency", "50us", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["strategy", "N", "step", "ms", "speedup", "efficiency"]
    assert [line.split()[:2] for line in lines[1:10]] == [
        [s, n] for s in ("ddp", "ps", "pipeline") for n in ("1", "2", "8")]
    assert (out / "plan.png").stat().st_size > 0
    assert len((out / "plan.csv").read_text().splitlines()) == 10


def test_plan_rejects_bad_counts(tmp_path, capsys):
    from raydist.cli import main

    assert main(["plan", "--counts", "0,2", "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err == "error: workers: got '0,2'; expected worker counts like 1,2,4,8\n"

