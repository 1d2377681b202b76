"""ZeRO-1 for ddp (shard_optimizer: torch's ZeroRedundancyOptimizer around raydist's rule): the
same parameters as local, each worker's optimizer state about half of plain ddp's, and a failed
worker's restart from the consolidated checkpoint bit for bit."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from raydist.config import RunSpec
from raydist.engine import Record, RunResult
from raydist.engine.record import documented
from raydist.runtime import faults
from raydist.train import train

pytestmark = pytest.mark.timeout(1200)
# hidden 64, 64: tensors of 4096, 4096, 640, 64, 64 and 10 elements. ZeRO gives whole tensors,
# largest first, to the rank holding least: 4736 and 4234 of 8970, at most 0.53 of the state.
BASE = {"model": "mlp", "data": "digits", "hidden": [64, 64], "epochs": 2, "batch_size": 64,
        "seed": 0, "workers": 2, "val_fraction": 0.1, "strategy": "ddp"}
RULES = ["adam", "momentum"]  # torch's Adam; raydist's own EMA momentum class


def spec(out: Path, **changes: object) -> RunSpec:
    return RunSpec.from_dict({**BASE, "out": str(out), **changes})


def quiet(s: RunSpec) -> RunResult:
    return train(s, report=lambda rec: None)


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero")
    local = {o: quiet(spec(tmp / f"local_{o}", optimizer=o, strategy="local", workers=1)) for o in RULES}
    jobs = {o: spec(tmp / f"zero_{o}", optimizer=o, shard_optimizer=True) for o in RULES}
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(jobs, pool.map(quiet, jobs.values()), strict=True))
    return tmp, local, done


@pytest.mark.ray
@pytest.mark.parametrize("optimizer", RULES)
def test_zero1_matches_local(runs, optimizer):
    tmp, local, done = runs
    ref, mine = local[optimizer].state_dict, done[optimizer].state_dict
    assert list(mine) == list(ref)
    assert max((mine[k] - ref[k]).abs().max().item() for k in ref) <= 1e-5
    saved = torch.load(tmp / f"zero_{optimizer}" / "model.pt")
    assert list(saved) == list(ref)
    assert all(documented(k) for rec in done[optimizer].metrics for k in rec)


@pytest.mark.ray
def test_each_worker_keeps_about_half_the_optimizer_state(runs):
    """Against the whole model's Adam state, which local's one process holds (as every rank of
    plain ddp does: tests/test_fsdp.py checks that ddp's ranks each hold it all)."""
    _, local, done = runs
    for zero, whole in zip(done["adam"].metrics, local["adam"].metrics, strict=True):
        shares = [w["optimizer_state_bytes"] for w in zero["per_worker_memory"]]
        assert len(shares) == 2 and all(s > 0 for s in shares)  # both ranks hold a share
        assert zero["optimizer_state_bytes"] == max(shares)
        assert zero["optimizer_state_bytes"] <= 0.55 * whole["optimizer_state_bytes"]


@pytest.mark.ray
def test_a_failed_worker_resumes_bit_for_bit(runs, monkeypatch):
    """Worker 1 fails in epoch 2; the group restarts from epoch 1's checkpoint, whose optimizer
    state rank 0 consolidated, and ends with the uninterrupted run's model exactly."""
    tmp, _, done = runs
    monkeypatch.setenv(faults.ENV, "1:2")
    out = tmp / "fault"
    records: list[Record] = []
    result = train(spec(out, optimizer="adam", shard_optimizer=True, max_failures=1),
                   report=records.append)
    assert (out / faults.MARKER).exists()
    assert [r["epoch"] for r in records] == [1, 2]
    reference = done["adam"].state_dict
    assert [k for k in reference if not torch.equal(result.state_dict[k], reference[k])] == []
