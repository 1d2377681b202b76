"""Data that does not fit in memory: `parquet-dir:PATH` and `csv-dir:PATH`, a folder (or an
s3:// / gs:// URI on a cluster) of many files streamed through Ray Data, never loaded whole.

- Files: PATH/train/ and PATH/val/ when both exist; else every file of PATH, of which a
  seeded choice of round(val_fraction x files) (at least one; one file is kept for training)
  is the validation split. A whole file goes to one side: a row split would need a pass over
  every row at start.
- Columns: numeric; the target is `target` (default: the last column). An integer target holds
  classes 0..C-1 (C = its largest value + 1); a float one is regression. Features are used as
  they are stored (standardise them when writing the files): their statistics would cost a pass.
- Counts and the target's range come from the Parquet footers (no rows read); a CSV folder is
  read once, batch by batch, by pyarrow at the start. The first rows of the first file are
  the probe the pre-flight runs the model on.
- Reading: a Ray Data task per file (`read_files`, pyarrow), asking for no CPU, at most
  READ_TASKS per stream at once: a stream progresses whatever CPUs the training holds.
- Order, fixed by (seed, epoch): the training files are read in an order shuffled once by
  seed, one Ray Data block per file, with `preserve_order`; rows then pass a local shuffle
  buffer of SHUFFLE_ROWS rows seeded by (seed, epoch) (`iter_torch_batches`); global batches
  are consecutive `batch_size` rows of that stream. Every ddp worker takes the stream unsplit
  (`get_dataset_shard`, `DataConfig(datasets_to_split=[])`) and keeps its part of each global
  batch, as in memory: Ray Data's split hands blocks to whichever worker asks first, which
  would tie the batches to timing. So ddp (and fsdp, the same way) follows local on a stream
  too; the price is that each worker reads the whole epoch.

local, ddp and fsdp read streams (their STREAMS = True); ps, pipeline and tp refuse them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from raydist.data import DATASETS, Dataset
from raydist.errors import ConfigError

if TYPE_CHECKING:  # annotations only: config sits above this layer and imports it
    from raydist.config import RunSpec

READ_TASKS = 2
"""Read tasks at once per stream: the file being trained on and the next. They ask for no CPU.
Under Ray Train, Ray Data's CPU budget is what the cluster has beyond the workers' reservation,
shared by the streams being read: with as many workers as CPUs (2 on a 2-core machine) that is
none, and a task asking for a CPU would never start (nor could Ray place it). This is also why
the files are not read by ray.data.read_parquet: in Ray 2.60 it lists them at execution in a
task that asks for 1 CPU whatever num_cpus says (its V1 reader samples files in such tasks).
Reading a file is pyarrow's work either way."""
SHUFFLE_ROWS = 4096  # rows in the local shuffle buffer (the stream's only row-level mixing)
EVAL_ROWS = 2048
PROBE_ROWS = 8


@dataclass
class Rows:
    """One batch of a stream: its features and targets (len: its samples)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class Streamed(Dataset):
    """A Dataset whose x_train / x_val hold only a probe of PROBE_ROWS rows; the rows come
    from the files through Ray Data."""

    kind: str = "parquet"
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    features: list[str] = field(default_factory=list)
    target: str = ""
    rows_train: int = 0
    rows_val: int = 0
    seed: int = 0
    sources: dict[str, Any] = field(default_factory=dict, repr=False)
    """'train' / 'val': what to iterate, a ray.data.Dataset or a Train worker's DataIterator"""

    streamed = True

    @property
    def n_train(self) -> int:
        return self.rows_train

    @property
    def n_val(self) -> int:
        return self.rows_val

    def ray_datasets(self) -> dict[str, Any]:
        """The Ray Data datasets of both splits, the training files in an order shuffled by seed."""
        order = torch.randperm(len(self.train_files), generator=torch.Generator().manual_seed(self.seed))
        return {"train": self.read([self.train_files[i] for i in order]), "val": self.read(self.val_files)}

    def read(self, files: list[str]) -> Any:
        """The files as a Ray Data dataset, one block per file in this order, read by tasks that
        ask for no CPU (READ_TASKS says why)."""
        import ray

        # Ray Data would join whatever cluster it finds: the strategy has started or joined one
        assert ray.is_initialized(), "a streamed data set is read on a running Ray"
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # the console keeps the epoch lines
        names = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
        ds = names.map_batches(read_files, batch_size=None, batch_format="pyarrow", num_cpus=0,
                               compute=ray.data.TaskPoolStrategy(size=READ_TASKS),
                               fn_kwargs={"kind": self.kind, "columns": [*self.features, self.target]})
        ds.context.execution_options.preserve_order = True  # the blocks come in the files' order
        # A Ray Train worker's progress bars reach the console past out/ray.log: the epoch lines
        # keep it (and the note that they are off goes unsaid)
        ds.context.enable_progress_bars = False
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        return ds

    def source(self, split: str) -> Any:
        if split not in self.sources:
            self.sources.update(self.ray_datasets())
        return self.sources[split]

    def in_worker(self, shard: Any) -> Streamed:
        """This set as a ddp worker reads it: through `shard(name)` (get_dataset_shard)."""
        return dataclasses.replace(self, sources={"train": shard("train"), "val": shard("val")})

    def epoch_batches(self, size: int, seed: int, epoch: int) -> StreamBatches:
        return StreamBatches(self, size, seed * 1_000_003 + epoch)

    def rows(self, batch: Rows, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor_split(batch.x, world)[rank], torch.tensor_split(batch.y, world)[rank]

    def val_batches(self, size: int = EVAL_ROWS) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for rows in self.stream("val", size, None):
            yield rows.x, rows.y

    def stream(self, split: str, size: int, seed: int | None) -> Iterator[Rows]:
        shuffle = {} if seed is None else {"local_shuffle_buffer_size": SHUFFLE_ROWS,
                                           "local_shuffle_seed": seed}
        for batch in self.source(split).iter_torch_batches(batch_size=size, device="cpu", **shuffle):
            x = torch.stack([batch[c].to(torch.float32) for c in self.features], 1)
            y = batch[self.target]
            y = y.to(torch.int64) if self.task == "ce" else y.to(torch.float32).unsqueeze(1)
            yield Rows(x, y)


def read_files(names: pa.Table, kind: str, columns: list[str]) -> pa.Table:
    """In a Ray Data task: the rows of the files named in `names` (one, a block of its own),
    `columns` only."""
    return pa.concat_tables([read_file(f, kind, columns) for f in names.column("file").to_pylist()])


def read_file(path: str, kind: str, columns: list[str]) -> pa.Table:
    fs, where = pafs.FileSystem.from_uri(path if "://" in path else f"file://{_abs(path)}")
    if kind == "parquet":
        return pq.read_table(where, columns=columns, filesystem=fs)
    with fs.open_input_stream(where) as stream:
        return pacsv.read_csv(stream).select(columns)


class StreamBatches:
    """The global batches of one epoch of a stream: len() without reading, rows as iterated."""

    def __init__(self, data: Streamed, size: int, seed: int) -> None:
        self.data, self.size, self.seed = data, size, seed
        self.samples = data.n_train

    def __len__(self) -> int:
        return -(-self.data.n_train // self.size)

    def __iter__(self) -> Iterator[Rows]:
        return self.data.stream("train", self.size, self.seed)


# --- the folder --------------------------------------------------------------------------------

def listing(path: str, suffix: str) -> tuple[pafs.FileSystem, list[str]]:
    try:
        fs, root = pafs.FileSystem.from_uri(path if "://" in path else f"file://{_abs(path)}")
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    except (OSError, pa.ArrowInvalid) as e:
        raise ConfigError(f"{path}: cannot be listed as a folder ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
    return fs, files


def _abs(path: str) -> str:
    return str(Path(path).resolve())


def uri(folder: str, path: str) -> str:
    """A listed file as Ray Data reads it: a local path, or under the folder's scheme (s3://...)."""
    return f"{folder.split('://', 1)[0]}://{path}" if "://" in folder else path


def split_files(path: str, suffix: str, spec: RunSpec) -> tuple[pafs.FileSystem, list[str], list[str]]:
    fs, top = listing(path, suffix)
    _, train = listing(f"{path.rstrip('/')}/train", suffix) if _is_dir(fs, path, "train") else (fs, [])
    _, val = listing(f"{path.rstrip('/')}/val", suffix) if _is_dir(fs, path, "val") else (fs, [])
    if train and val:
        return fs, train, val
    if len(top) < 2:
        raise ConfigError(f"{path}: needs at least 2 *{suffix} files (one for validation), or "
                          f"train/ and val/ folders of them; found {len(top)}")
    order = torch.randperm(len(top), generator=torch.Generator().manual_seed(spec.seed)).tolist()
    n_val = min(len(top) - 1, max(1, round(len(top) * spec.val_fraction)))
    held = set(order[:n_val])
    return fs, [f for i, f in enumerate(top) if i not in held], [f for i, f in enumerate(top) if i in held]


def _is_dir(fs: pafs.FileSystem, path: str, sub: str) -> bool:
    root = pafs.FileSystem.from_uri(path if "://" in path else f"file://{_abs(path)}")[1]
    return fs.get_file_info(f"{root.rstrip('/')}/{sub}").type == pafs.FileType.Directory


@dataclass
class Survey:
    """What the start needs of a folder's files: rows per split, the target's range, a probe."""

    columns: list[str]
    rows: dict[str, int]
    low: float
    high: float
    integral: bool
    probe: pa.Table


def survey_parquet(fs: pafs.FileSystem, files: dict[str, list[str]]) -> Survey:
    """From the footers only: counts and the target's min / max statistics."""
    first = pq.ParquetFile(files["train"][0], filesystem=fs)
    columns = first.schema_arrow.names
    rows = {split: sum(pq.ParquetFile(f, filesystem=fs).metadata.num_rows for f in fs_files)
            for split, fs_files in files.items()}
    probe = next(first.iter_batches(batch_size=PROBE_ROWS))
    return Survey(columns, rows, 0.0, 0.0, True, pa.Table.from_batches([probe]))


def parquet_range(fs: pafs.FileSystem, files: list[str], target: str) -> tuple[float, float, bool]:
    low, high, integral = np.inf, -np.inf, True
    for f in files:
        meta = pq.ParquetFile(f, filesystem=fs).metadata
        col = meta.schema.to_arrow_schema().get_field_index(target)
        integral &= pa.types.is_integer(meta.schema.to_arrow_schema().field(col).type)
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(col).statistics
            if stats is None or not stats.has_min_max:
                raise ConfigError(f"{f}: column '{target}' has no min/max statistics; write the "
                                  "files with statistics (pyarrow's default)")
            low, high = min(low, stats.min), max(high, stats.max)
    return float(low), float(high), integral


def survey_csv(fs: pafs.FileSystem, files: dict[str, list[str]], target: str | None) -> Survey:
    """One pass, a batch at a time: counts and the target's range."""
    rows, low, high, integral, probe, columns = {}, np.inf, -np.inf, True, None, []
    for split, paths in files.items():
        rows[split] = 0
        for f in paths:
            with fs.open_input_stream(f) as stream:
                for batch in pacsv.open_csv(stream):
                    columns = columns or batch.schema.names
                    if probe is None:
                        probe = pa.Table.from_batches([batch.slice(0, PROBE_ROWS)])
                    y = batch.column(target or columns[-1])
                    integral &= pa.types.is_integer(y.type)
                    low = min(low, pa.compute.min(y).as_py())
                    high = max(high, pa.compute.max(y).as_py())
                    rows[split] += batch.num_rows
    return Survey(columns, rows, float(low), float(high), integral, probe)


def load_folder(spec: RunSpec, path: str, kind: str) -> Streamed:
    if not path:
        raise ConfigError(f"data: '{kind}-dir' needs a folder: {kind}-dir:PATH")
    fs, train, val = split_files(path, f".{kind}", spec)
    files = {"train": train, "val": val}
    s = survey_parquet(fs, files) if kind == "parquet" else survey_csv(fs, files, spec.target)
    target = spec.target or s.columns[-1]
    if target not in s.columns:
        raise ConfigError(f"{path}: no target column '{target}'; columns are {', '.join(s.columns)}")
    features = [c for c in s.columns if c != target]
    if not features:
        raise ConfigError(f"{path}: needs at least one feature column besides '{target}'")
    for c in s.columns:
        kind_of = s.probe.schema.field(c).type
        if not (pa.types.is_integer(kind_of) or pa.types.is_floating(kind_of)):
            raise ConfigError(f"{path}: column '{c}' is not numeric ({kind_of})")
    low, high, integral = (parquet_range(fs, train + val, target) if kind == "parquet"
                           else (s.low, s.high, s.integral))
    if integral and low < 0:
        raise ConfigError(f"{path}: integer target '{target}' has {low:g}; classes are 0..C-1")
    x = torch.tensor(np.stack([s.probe.column(c).to_numpy().astype(np.float32) for c in features], 1))
    yv = s.probe.column(target).to_numpy()
    info = ({"task": "ce", "out_dim": int(high) + 1} if integral else {"task": "mse", "out_dim": 1})
    y = torch.tensor(yv, dtype=torch.int64) if integral else torch.tensor(yv, dtype=torch.float32)[:, None]
    return Streamed(f"{kind}-dir:{path}", x, y, x, y, inputs="features", **info, kind=kind,
                    train_files=[uri(path, f) for f in train], val_files=[uri(path, f) for f in val],
                    features=features, target=target, rows_train=s.rows["train"], rows_val=s.rows["val"],
                    seed=spec.seed)


@DATASETS.register("parquet-dir")
def parquet_dir(spec: RunSpec, path: str) -> Streamed:
    """A folder of Parquet files, streamed through Ray Data."""
    return load_folder(spec, path, "parquet")


@DATASETS.register("csv-dir")
def csv_dir(spec: RunSpec, path: str) -> Streamed:
    """A folder of CSV files, streamed through Ray Data."""
    return load_folder(spec, path, "csv")
