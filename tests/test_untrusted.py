"""Results folders are untrusted files (raydist/engine/checkpoint.py): a checkpoint that would run code
when unpickled is refused with one error line before any work, nothing raydist writes needs more
than torch.load(weights_only=True), and a crash mid-write leaves the previous file whole."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from raydist import cli
from raydist.config import ConfigError, RunSpec
from raydist.engine import RunResult, checkpoint, outputs
from raydist.strategies import ddp
from raydist.train import train

SMALL = {"model": "mlp", "data": "digits", "hidden": [16], "epochs": 2, "batch_size": 128, "seed": 3}
RUNS = {"ps": {"workers": 2}, "pipeline": {}, "ddp": {"workers": 2}}
REFUSED = "refused to unpickle: Trying to load unsupported GLOBAL posix.system whose module posix is blocked"


class Payload:
    """Unpickled, it runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tamper(path: Path, marker: Path) -> None:
    """A torch file as raydist's own look (a dict with a history), but holding the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"history": [], "model": {"w": torch.zeros(2)}, "rng": Payload(marker)}, path)


def checkpoint_of(strategy: str, out: Path) -> Path:
    """Where a strategy's run keeps the checkpoint a new run in `out` resumes from."""
    if strategy == "ddp":
        return out / ddp.STORAGE / ddp.RUN / "checkpoint_2026-01-01_00-00-00.000000" / ddp.STATE
    return out / checkpoint.NAME


def claimed(tmp_path: Path, strategy: str) -> tuple[Path, RunSpec]:
    """A results folder as a run of `strategy` leaves it: its spec.yaml."""
    out = tmp_path / strategy
    spec = RunSpec.from_dict({**SMALL, **RUNS.get(strategy, {}), "strategy": strategy, "out": str(out)})
    out.mkdir()
    spec.save(out / "spec.yaml")
    return out, spec


@pytest.mark.unit
def test_the_payload_runs_code_when_unpickled(tmp_path):
    """The tests below would be void if unpickling the payload did nothing."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.unit
@pytest.mark.parametrize("strategy", ["ps", "pipeline", "ddp"])
def test_a_tampered_checkpoint_is_refused_before_any_work(tmp_path, capsys, strategy):
    """`raydist train` resuming a folder whose checkpoint and model.pt were replaced: exit 2,
    one line naming the file, the payload never ran, and Ray never started (unit tier: ray.init
    raises), so nothing was trained."""
    out, _ = claimed(tmp_path, strategy)
    marker = tmp_path / "marker"
    saved = checkpoint_of(strategy, out)
    tamper(saved, marker)
    tamper(out / "model.pt", marker)
    capsys.readouterr()
    assert cli.main(["train", "--config", str(out / "spec.yaml"), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"error: {saved}: not a raydist checkpoint ({REFUSED}); remove it or "
                            "choose another out\n")
    assert captured.out == ""
    assert not marker.exists()
    assert not (out / "metrics.csv").exists()


@pytest.mark.unit
def test_a_local_run_reads_nothing_it_finds_and_replaces_model_pt(tmp_path, capsys):
    """local keeps no checkpoint (RESUMES is False): a tampered folder is never unpickled, and
    its model.pt is replaced by one that loads with weights_only=True."""
    out, _ = claimed(tmp_path, "local")
    marker = tmp_path / "marker"
    tamper(out / checkpoint.NAME, marker)
    tamper(out / "model.pt", marker)
    assert cli.main(["train", "--config", str(out / "spec.yaml"), "--epochs", "1", "--out", str(out)]) == 0
    assert not marker.exists()
    model = torch.load(out / "model.pt", weights_only=True)
    assert list(model) == ["fc0.0.weight", "fc0.0.bias", "head.weight", "head.bias"]


@pytest.mark.unit
def test_a_torn_or_foreign_checkpoint_is_refused_by_name(tmp_path):
    out, spec = claimed(tmp_path, "ps")
    path = out / checkpoint.NAME
    checkpoint.write(str(out), {"history": [{"epoch": 1}], "weights": {"w": torch.ones(3)}})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError) as e:
        checkpoint.resume(spec)
    assert str(e.value) == (f"{path}: not a raydist checkpoint (cannot read it: RuntimeError: "
                            "PytorchStreamReader failed reading zip archive: failed finding central "
                            "directory); remove it or choose another out")
    torch.save({"fc0.0.weight": torch.zeros(2)}, path)  # a model.pt put in its place
    with pytest.raises(ConfigError) as e:
        checkpoint.resume(spec)
    assert str(e.value) == (f"{path}: not a raydist checkpoint (no history in it); remove it or "
                            "choose another out")


@pytest.mark.unit
def test_state_that_would_not_load_back_is_refused_when_saved(tmp_path):
    """numpy in a checkpoint loads only with weights_only=False: refused at the first save, by
    where it sits, not found out when a resume cannot read it."""
    import numpy as np

    with pytest.raises(TypeError, match=r"^checkpoint.pt\['weights'\]\['w'\] is a numpy.ndarray; "):
        checkpoint.write(str(tmp_path), {"history": [], "weights": {"w": np.zeros(2)}})
    with pytest.raises(TypeError, match=r"^checkpoint.pt\['history'\]\[0\]\['loss'\] is a numpy.float64; "):
        checkpoint.write(str(tmp_path), {"history": [{"loss": np.float64(1.0)}]})
    assert list(tmp_path.iterdir()) == []


class Crash(Exception):
    """A write that dies half way (disk full, or the process killed mid-write)."""


def torn_save(real):
    """torch.save that writes half of the file and then dies."""

    def save(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        data = Path(f).read_bytes()
        Path(f).write_bytes(data[: len(data) // 2])
        raise Crash

    return save


@pytest.mark.unit
def test_a_crash_mid_write_leaves_the_previous_checkpoint_and_model(tmp_path, monkeypatch):
    first = {"history": [{"epoch": 1}], "weights": {"w": torch.arange(3.0)}}
    checkpoint.write(str(tmp_path), first)
    result = RunResult([{"epoch": 1, "train_loss": 0.5}], {"w": torch.arange(3.0)})
    spec = RunSpec.from_dict({**SMALL, "out": str(tmp_path)})
    outputs.save_outputs(tmp_path, spec, result)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    monkeypatch.setattr(torch, "save", torn_save(torch.save))
    with pytest.raises(Crash):
        checkpoint.write(str(tmp_path), {"history": [{"epoch": 1}, {"epoch": 2}],
                                         "weights": {"w": torch.zeros(3)}})
    with pytest.raises(Crash):
        outputs.save_outputs(tmp_path, spec, RunResult(result.metrics * 2, {"w": torch.zeros(3)}))
    monkeypatch.undo()

    assert checkpoint.read(str(tmp_path))["history"] == [{"epoch": 1}]
    assert torch.equal(checkpoint.read(str(tmp_path))["weights"]["w"], torch.arange(3.0))
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["w"], torch.arange(3.0))
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "metrics.csv"}
    assert after == {k: v for k, v in before.items() if k != "metrics.csv"}  # and no temporary file


@pytest.mark.ray
def test_a_run_whose_checkpoint_write_died_resumes_from_the_one_before(ray_local, tmp_path, monkeypatch):
    """ps writes its checkpoint in the driver: the write of epoch 3 dies half way, the run ends;
    the same command again continues from epoch 2's checkpoint (only epoch 3 is trained) and ends
    bit for bit where an uninterrupted run does."""
    kw = {**SMALL, "strategy": "ps", "workers": 2, "epochs": 3, "optimizer": "adam"}
    clean = train(RunSpec.from_dict({**kw, "out": str(tmp_path / "clean")}), lambda r: None)
    spec = RunSpec.from_dict({**kw, "out": str(tmp_path / "torn")})
    writes, real = [], torch.save

    def dies_at_epoch_3(obj, f, *args, **kwargs):
        writes.append(f)
        (torn_save(real) if len(writes) == 3 else real)(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dies_at_epoch_3)
    with pytest.raises(Crash):
        train(spec, lambda r: None)
    monkeypatch.undo()
    before = checkpoint.read(spec.out)["history"]
    assert [r["epoch"] for r in before] == [1, 2]
    reports = []
    result = train(spec, reports.append)
    assert [r["epoch"] for r in reports] == [3]
    assert list(result.state_dict) == list(clean.state_dict)
    assert all(torch.equal(result.state_dict[k], clean.state_dict[k]) for k in clean.state_dict)
    assert result.metrics[:2] == before  # epochs 1 and 2 came from the checkpoint, not retrained
