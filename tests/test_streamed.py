"""Streamed data (`parquet-dir:PATH`): a folder of 20 Parquet files, 200 000 rows, read through
Ray Data as the epoch goes. local never holds more than a batch of it, and ddp with 2 workers
(each through get_dataset_shard) ends where local does.

What "never loaded whole" is checked by: the driver's process gets every row of the epoch, but
only in batches of at most batch_size rows (a spy on the stream), the Dataset's own tensors
hold a probe of a few rows, and every Ray Data call that would bring the whole set into this
process (materialize, take_all, to_pandas, to_arrow_refs, to_pandas_refs, iter_rows, to_numpy_refs)
raises here. RSS is not used: this process maps Ray's shared object store, whose pages count
in it whatever holds them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray.data
import torch

from raydist.cli import main
from raydist.config import ConfigError, RunSpec
from raydist.data import load_data, streamed
from raydist.train import train

FILES, ROWS, FEATURES = 20, 10_000, 8
BASE = {"strategy": "local", "optimizer": "sgd", "lr": 0.1, "epochs": 1, "batch_size": 1024,
        "hidden": [16], "seed": 3}
WHOLE = ("materialize", "take_all", "to_pandas", "to_arrow_refs", "to_pandas_refs", "iter_rows",
         "to_numpy_refs")


def write_folder(root: Path, files: int = FILES, rows: int = ROWS) -> Path:
    """`files` Parquet files of `rows` rows: 8 features in [0, 1), a learnable binary label."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(files):
        x = rng.random((rows, FEATURES), dtype=np.float32)
        y = ((np.sin(3 * x[:, 0]) + x[:, 1] * x[:, 2] - x[:, 3]) > 0.3).astype(np.int64)
        frame = pd.DataFrame(x, columns=[f"f{j}" for j in range(FEATURES)]).assign(label=y)
        frame.to_parquet(root / f"part-{i:03d}.parquet", index=False)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("stream") / "data")


def spec(folder: Path, out: Path, **changes) -> RunSpec:
    return RunSpec.from_dict({**BASE, "data": f"parquet-dir:{folder}", "out": str(out), **changes})


@pytest.mark.unit
def test_the_folder_is_split_by_seed_without_reading_rows(folder):
    data = load_data(spec(folder, Path("x")))
    assert (data.n_train, data.n_val) == (16 * ROWS, 4 * ROWS)  # 20% of the files, from the footers
    assert len(data.x_train) <= streamed.PROBE_ROWS and (data.task, data.out_dim) == ("ce", 2)
    assert set(data.train_files).isdisjoint(data.val_files) and len(data.train_files) == 16
    assert load_data(spec(folder, Path("x"))).val_files == data.val_files
    assert load_data(spec(folder, Path("x"), seed=4)).val_files != data.val_files


@pytest.mark.unit
def test_train_and_val_folders_are_taken_as_they_are(tmp_path):
    write_folder(tmp_path / "d" / "train", files=3, rows=50)
    write_folder(tmp_path / "d" / "val", files=1, rows=20)
    data = load_data(spec(tmp_path / "d", tmp_path / "out"))
    assert (data.n_train, data.n_val, len(data.val_files)) == (150, 20, 1)


@pytest.mark.unit
@pytest.mark.parametrize("changes, message", [
    ({"strategy": "ps"}, "data: parquet-dir:{f} is streamed through Ray Data, which ps does not read; use "
                         "strategy local, ddp or fsdp, or a parquet:FILE that fits in memory"),
    ({"optimizer": "gd", "lr": None}, "optimizer: gd takes the whole training set as one batch, which a "
                                      "streamed data set (parquet-dir:{f}) never holds; use sgd or another"),
    ({"target": "nope"}, "{f}: no target column 'nope'; columns are f0, f1, f2, f3, f4, f5, f6, f7, label"),
])
def test_what_a_stream_refuses_is_one_error_line(folder, tmp_path, capsys, changes, message):
    args = ["train", "--data", f"parquet-dir:{folder}", "--out", str(tmp_path / "run"),
            *[a for k, v in changes.items() if v is not None for a in (f"--{k}", str(v))]]
    assert main(args) == 2
    assert capsys.readouterr().err == f"error: {message.format(f=folder)}\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.unit
def test_a_folder_of_one_file_is_refused(tmp_path):
    write_folder(tmp_path / "one", files=1, rows=10)
    with pytest.raises(ConfigError) as e:
        load_data(spec(tmp_path / "one", tmp_path / "out"))
    assert str(e.value) == (f"{tmp_path / 'one'}: needs at least 2 *.parquet files (one for validation), "
                            "or train/ and val/ folders of them; found 1")


def refuse_whole(*args, **kwargs):
    raise AssertionError("the driver brought a whole data set into memory")


@pytest.mark.ray
def test_local_reads_the_stream_in_batches_and_ddp_ends_equal(ray_local, folder, tmp_path, monkeypatch):
    seen: list[int] = []
    stream = streamed.Streamed.stream

    def spy(self, split, size, seed):
        for rows in stream(self, split, size, seed):
            if split == "train":
                seen.append(len(rows))
            yield rows

    monkeypatch.setattr(streamed.Streamed, "stream", spy)
    for name in WHOLE:
        monkeypatch.setattr(ray.data.Dataset, name, refuse_whole)
    local = train(spec(folder, tmp_path / "local"))
    assert sum(seen) == 16 * ROWS and max(seen) == 1024 and len(seen) == 157
    monkeypatch.undo()

    ddp = train(spec(folder, tmp_path / "ddp", strategy="ddp", workers=2))
    for key, value in local.state_dict.items():
        torch.testing.assert_close(ddp.state_dict[key], value, rtol=0, atol=1e-5)
    assert local.metrics[0]["train_loss"] == pytest.approx(ddp.metrics[0]["train_loss"], abs=1e-5)
    assert local.metrics[0]["val_accuracy"] > 0.6  # it learns from the stream


@pytest.mark.unit
def test_a_csv_folder_is_counted_in_one_pass(tmp_path):
    root = tmp_path / "csv"
    root.mkdir()
    for i in range(3):
        pd.DataFrame({"a": [0.5 * i, 1.0, 2.0], "b": [1, 2, 3], "y": [0.1, 0.2, 0.3 + i]}).to_csv(
            root / f"part-{i}.csv", index=False)
    data = load_data(RunSpec.from_dict({"data": f"csv-dir:{root}", "val_fraction": 0.3}))
    assert (data.n_train, data.n_val, data.features, data.target) == (6, 3, ["a", "b"], "y")
    assert (data.task, data.out_dim, data.y_train.dtype) == ("mse", 1, torch.float32)
