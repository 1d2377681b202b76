"""Memory in the records of the actor strategies (issue 17): every ps replica and server and every
pipeline stage reports its own fields (memory.csv), the record holds their maxima, and each
worker's measured model state is within 10% of what raydist/memory/footprint.py predicts for it (the
prediction `raydist plan` prints and the pre-flight checks memory_per_worker against)."""

from __future__ import annotations

import pandas as pd
import pytest

from raydist.config import RunSpec
from raydist.engine import setup
from raydist.memory import footprint
from raydist.strategies import get
from raydist.train import train

pytestmark = pytest.mark.ray

SMALL = {"model": "mlp", "data": "digits", "hidden": [32, 16], "epochs": 1, "batch_size": 128,
         "optimizer": "adam"}
FIELDS = ["epoch", "worker", "model_state_bytes", "optimizer_state_bytes", "peak_rss_bytes"]


def run(tmp_path, **kw) -> tuple[RunSpec, dict, pd.DataFrame]:
    spec = RunSpec.from_dict({**SMALL, "out": str(tmp_path / "run"), **kw})
    rec = train(spec, report=lambda r: None).metrics[0]
    return spec, rec, pd.read_csv(tmp_path / "run" / "memory.csv")


def predicted(spec: RunSpec) -> dict[str, float]:
    data, model, _ = setup(spec)
    sizes = footprint.sizes_of(model, spec.model, spec.optimizer, data.x_train[:1])
    strategy = get(spec.strategy)
    workers = strategy.cost.worker_bytes(sizes, footprint.Layout.of(spec, strategy.COUNT))
    return {w.role: w.state for w in workers}


def check(rec: dict, mem: pd.DataFrame, want: dict[str, float]) -> None:
    assert list(mem.columns[: len(FIELDS)]) == FIELDS
    got = dict(zip(mem["worker"], mem["model_state_bytes"], strict=True))
    assert set(got) == set(want)
    for worker, bytes_ in got.items():
        assert abs(bytes_ - want[worker]) <= 0.1 * want[worker], (worker, bytes_, want[worker])
    for field in ("model_state_bytes", "optimizer_state_bytes", "peak_rss_bytes"):
        assert rec[field] == mem[field].max()
    assert mem["peak_rss_bytes"].min() > 50 * 2**20  # a Ray worker with torch imported


def test_ps_replicas_hold_weights_and_gradients_servers_weights_and_optimizer_state(ray_local, tmp_path):
    spec, rec, mem = run(tmp_path, strategy="ps", workers=2, servers=2)
    want = predicted(spec)
    replica = want.pop("replica")
    check(rec, mem, {"replica 0": replica, "replica 1": replica, **want})
    # digits 64 -> 32 -> 16 -> 10: the 64x32 weight (8,192 bytes) alone on server 0, with Adam's m, v
    assert mem.set_index("worker").loc["server 0", "model_state_bytes"] == 3 * 8192 + 4  # + its step count
    assert mem.set_index("worker").loc["replica 0", "optimizer_state_bytes"] == 0


def test_pipeline_stages_hold_their_blocks_state(ray_local, tmp_path):
    spec, rec, mem = run(tmp_path, strategy="pipeline", stages=2)
    check(rec, mem, predicted(spec))
    assert mem["worker"].tolist() == ["stage 0", "stage 1"]
