"""fsdp on Ray Train (FSDP2): the same parameters as local for the article's six optimizers and
on gpt, a worker's record holding about half of ddp's model state, checkpoints that resume
bit for bit at the same worker count and resharded at another, bf16 and CPU offload, and a
checkpoint index that would run code refused before Ray starts."""

from __future__ import annotations

import math
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import torch

from raydist.config import ConfigError, RunSpec
from raydist.engine import Record, RunResult, checkpoint
from raydist.engine.record import documented
from raydist.runtime import faults
from raydist.strategies import fsdp
from raydist.train import train

pytestmark = pytest.mark.timeout(1200)
SIX = ["gd", "sgd", "momentum", "adagrad", "rmsprop", "adam"]
# digits with 10% held out: 1617 training samples, so gd's full batch and each epoch's last
# batch (17) split unevenly over 2 workers; hidden 16 and 10 outputs split evenly in two
BASE = {"model": "mlp", "data": "digits", "hidden": [16], "epochs": 2, "batch_size": 64,
        "seed": 0, "workers": 2, "val_fraction": 0.1}
# Momentum, not Adam: Adam scales any round-off up to a full lr step (tests/test_pipeline.py)
GPT = {"model": "gpt", "data": "text", "optimizer": "momentum", "layers": 2, "d_model": 32,
       "heads": 2, "seq_len": 16, "text_chars": 5000, "epochs": 2, "batch_size": 40, "workers": 2}


def spec(out: Path, **changes: object) -> RunSpec:
    return RunSpec.from_dict({**BASE, "strategy": "fsdp", "out": str(out), **changes})


def quiet(s: RunSpec) -> RunResult:
    return train(s, report=lambda rec: None)


def local_of(s: RunSpec) -> RunResult:
    """The same run on local (fsdp's own knobs at their defaults: local reads none of them)."""
    return quiet(s.replace(strategy="local", workers=1, out=s.out + "_local", cpu_offload=False,
                           reshard_after_forward=True, fsdp_param_dtype="float32"))


def furthest(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in b)


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory, trained):
    """local and fsdp for the six optimizers, and ddp for adam (the memory comparison: the very
    run tests/test_ddp.py trained, 3 epochs, when it ran first). The local runs go one by one
    (their weights come from torch's global RNG, which threads share); the Ray Train runs two at
    a time (2 x 2 workers fit the fixture's 4 CPUs)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    local = {opt: local_of(spec(tmp / f"fsdp_{opt}", optimizer=opt)) for opt in SIX}
    jobs = {opt: spec(tmp / f"fsdp_{opt}", optimizer=opt) for opt in SIX}
    plain = spec(tmp / "ddp_adam", strategy="ddp", epochs=3)
    if trained.get(plain) is None:
        jobs["ddp"] = plain
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(jobs, pool.map(quiet, jobs.values()), strict=True))
    done.setdefault("ddp", trained.get(plain))
    return tmp, local, done


@pytest.mark.ray
@pytest.mark.parametrize("optimizer", SIX)
def test_fsdp_matches_local(runs, optimizer):
    tmp, local, done = runs
    result, ref = done[optimizer], local[optimizer]
    assert furthest(result.state_dict, ref.state_dict) <= 1e-5
    for mine, theirs in zip(result.metrics, ref.metrics, strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
        assert abs(mine["val_accuracy"] - theirs["val_accuracy"]) <= 0.005
        assert mine["world_size"] == 2 and all(documented(k) for k in mine)
    saved = torch.load(tmp / f"fsdp_{optimizer}" / "model.pt")
    assert list(saved) == list(ref.state_dict)  # local's keys: no FSDP prefixes
    assert all(torch.equal(saved[k], result.state_dict[k]) for k in saved)
    assert list(pd.read_csv(tmp / f"fsdp_{optimizer}" / "metrics.csv")["epoch"]) == [1, 2]


@pytest.mark.ray
def test_a_worker_holds_about_half_of_ddps_model_state(runs):
    """Parameters, gradients and Adam's two moments sharded in two: each worker's figure is at
    most 0.55 of a ddp worker's, which holds them whole."""
    _, _, done = runs
    for rec_fsdp, rec_ddp in zip(done["adam"].metrics, done["ddp"].metrics[:2], strict=True):
        whole = [w["model_state_bytes"] for w in rec_ddp["per_worker_memory"]]
        assert whole == [rec_ddp["model_state_bytes"]] * 2  # every ddp rank holds it all
        workers = rec_fsdp["per_worker_memory"]
        assert [w["worker"] for w in workers] == ["rank 0", "rank 1"]
        assert rec_fsdp["model_state_bytes"] == max(w["model_state_bytes"] for w in workers)
        assert rec_fsdp["model_state_bytes"] <= 0.55 * rec_ddp["model_state_bytes"]
        assert rec_fsdp["optimizer_state_bytes"] <= 0.55 * rec_ddp["optimizer_state_bytes"]
        assert all(w["peak_rss_bytes"] > 0 for w in workers)


@pytest.mark.ray
def test_a_failed_worker_resumes_bit_for_bit(runs, monkeypatch):
    """Worker 1 fails in epoch 2; Ray Train restarts the group from epoch 1's sharded checkpoint,
    and the model equals the uninterrupted run's exactly."""
    tmp, _, done = runs
    monkeypatch.setenv(faults.ENV, "1:2")
    out = tmp / "fault"
    records: list[Record] = []
    result = train(spec(out, optimizer="adam", max_failures=1), report=records.append)
    assert (out / faults.MARKER).exists()  # the fault really fired
    assert [r["epoch"] for r in records] == [1, 2]
    reference = done["adam"].state_dict
    assert [k for k in reference if not torch.equal(result.state_dict[k], reference[k])] == []


@pytest.fixture(scope="module")
def resumed(runs) -> dict[int, tuple[RunResult, list[Record]]]:
    """The finished adam run (a copy each) run again for 3 epochs on 2 workers and on 1, both at
    once (2 + 1 workers fit the session's 4 CPUs): a fit mostly waits on its start-up."""
    tmp, _, _ = runs

    def again(workers: int) -> tuple[RunResult, list[Record]]:
        out = tmp / f"resume_{workers}"
        shutil.copytree(tmp / "fsdp_adam", out)
        records: list[Record] = []
        return train(spec(out, optimizer="adam", epochs=3, workers=workers), report=records.append), records

    with ThreadPoolExecutor(2) as pool:
        return dict(zip([2, 1], pool.map(again, [2, 1]), strict=True))


@pytest.mark.ray
@pytest.mark.parametrize("workers", [2, 1])
def test_a_second_run_continues_resharded_if_need_be(runs, resumed, workers):
    """A finished 2-epoch run on 2 workers run again for 3 epochs, on 2 workers or on 1 (its
    shards read back into other shards): epochs 1-2 come from the checkpoint, epoch 3 is trained
    from the restored model and optimizer, and the model still follows local."""
    tmp, _, done = runs
    result, records = resumed[workers]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert result.metrics[:2] == done["adam"].metrics
    assert result.metrics[2]["world_size"] == workers
    local = local_of(spec(tmp / f"three_{workers}", optimizer="adam", epochs=3))
    assert furthest(result.state_dict, local.state_dict) <= 1e-5


@pytest.mark.ray
def test_gpt_matches_local(ray_local, tmp_path):
    """Four blocks (embed, block0, block1, head), each its own FSDP unit."""
    s = RunSpec.from_dict({**GPT, "strategy": "fsdp", "out": str(tmp_path / "gpt")})
    assert furthest(quiet(s).state_dict, local_of(s).state_dict) <= 1e-5


@pytest.mark.ray
def test_cpu_offload_and_zero2_change_nothing_bf16_little(ray_local, tmp_path):
    """cpu_offload with reshard_after_forward false (ZeRO-2) computes what local does. bfloat16
    parameters in the forward and backward (8 significant bits: each product off by up to 0.4%)
    with float32 weights and reductions: after 2 epochs the losses stay within 3% of local's
    and the accuracy within 3 points (float32 runs agree to 1e-5)."""
    base = spec(tmp_path / "offload", optimizer="adam", cpu_offload=True, reshard_after_forward=False)
    bf16 = spec(tmp_path / "bf16", optimizer="adam", fsdp_param_dtype="bfloat16")
    with ThreadPoolExecutor(2) as pool:
        offloaded, half = pool.map(quiet, [base, bf16])
    ref = local_of(base)
    assert furthest(offloaded.state_dict, ref.state_dict) <= 1e-5
    for mine, theirs in zip(half.metrics, ref.metrics, strict=True):
        assert math.isfinite(mine["train_loss"]) and math.isfinite(mine["val_loss"])
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=0.03)
        assert abs(mine["val_accuracy"] - theirs["val_accuracy"]) <= 0.03
    assert all(v.dtype == torch.float32 for v in half.state_dict.values())


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.unit
@pytest.mark.parametrize("tampered", ["index", "state"])
def test_a_checkpoint_that_would_run_code_is_refused_before_ray(tmp_path, tampered):
    """DCP reads its .metadata index with pickle.load: raydist reads it with an unpickler of
    DCP's own classes, in the pre-flight (here: ray.init raises in a unit test) and in the
    workers. state.pt is plain data, as ddp's."""
    out, marker = tmp_path / "run", tmp_path / "marker"
    s = spec(out)
    out.mkdir()
    s.save(out / "spec.yaml")
    folder = out / "ray" / fsdp.RUN / "checkpoint_2026-01-01_00-00-00.000000"
    folder.mkdir(parents=True)
    checkpoint.save(folder / "state.pt", {"history": [], "epoch": 1})
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    if tampered == "state":
        (folder / ".metadata").unlink()
        torch.save({"history": [], "rng": Payload(marker)}, folder / "state.pt")
    refused = (r"^out: .*/\.metadata is not a checkpoint index raydist wrote" if tampered == "index" else
               r"/state\.pt: not a raydist checkpoint \(refused to unpickle")
    with pytest.raises(ConfigError, match=refused):
        train(s)
    assert not marker.exists()
