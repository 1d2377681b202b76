"""The built-in data sets: `digits`, `synthetic`, `text`, and a user's `csv:PATH` / `parquet:PATH`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from raydist.data import DATASETS, FLOAT32_MAX, Dataset, split
from raydist.errors import ConfigError

if TYPE_CHECKING:  # annotations only: config sits above this layer and imports it
    from raydist.config import RunSpec

# --- the registered data sets ------------------------------------------------------------------

@DATASETS.register("digits")
def digits(spec: RunSpec, _: str) -> Dataset:
    """The 1797 real 8x8 handwritten digits that scikit-learn ships (no download)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.int64)
    return split("digits", x, y, spec, task="ce", inputs="image", out_dim=10,
                 image_shape=(1, 8, 8))


@DATASETS.register("synthetic")
def synthetic(spec: RunSpec, _: str) -> Dataset:
    """The article's 8 random features in [0, 1), with a learnable (nonlinear) binary label.
    The data is fixed; only the split follows the seed."""
    g = torch.Generator().manual_seed(8)
    x = torch.rand(spec.samples, 8, generator=g)
    score = torch.sin(3 * x[:, 0]) + x[:, 1] * x[:, 2] - x[:, 3] + 0.5 * x[:, 4] ** 2
    y = (score > score.median()).float().unsqueeze(1)
    return split("synthetic", x, y, spec, task="bce", inputs="features", out_dim=1)


@DATASETS.register("text")
def text(spec: RunSpec, _: str) -> Dataset:
    """Characters of Python's own documentation (pydoc_data.topics, shipped with CPython):
    next-character prediction over sequences of `seq_len`."""
    from pydoc_data.topics import topics

    corpus = "\n".join(topics[k] for k in sorted(topics))[: spec.text_chars]
    vocab = sorted(set(corpus))
    ids = torch.tensor([vocab.index(c) for c in corpus], dtype=torch.int64)
    n = (len(ids) - 1) // spec.seq_len
    x = ids[: n * spec.seq_len].view(n, spec.seq_len)
    y = ids[1 : n * spec.seq_len + 1].view(n, spec.seq_len)
    return split("text", x, y, spec, task="ce", inputs="tokens", out_dim=len(vocab))


def _read_table(path: str, reader: Callable[[str], pd.DataFrame], kind: str) -> pd.DataFrame:
    if not path:
        raise ConfigError(f"data: '{kind}' needs a file: {kind}:PATH")
    if Path(path).is_dir():
        raise ConfigError(f"{path}: is a directory; expected a {kind} file")
    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        df = reader(path)
    except pd.errors.EmptyDataError:
        raise ConfigError(f"{path}: the file is empty") from None
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise ConfigError(f"{path}: cannot be read as {kind} ({type(e).__name__})") from None
    if df.empty:
        raise ConfigError(f"{path}: the file has no data rows")
    return df


def _table(spec: RunSpec, path: str, df: pd.DataFrame) -> Dataset:
    target = spec.target or df.columns[-1]
    if target not in df.columns:
        raise ConfigError(f"{path}: no target column '{target}'; columns are "
                          f"{', '.join(map(str, df.columns))}")
    for col in df.columns:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() & df[col].notna()
        if bad.any():
            row = int(np.argmax(bad.to_numpy()))
            raise ConfigError(f"{path}: column '{col}' is not numeric "
                              f"(row {row + 1}: {df[col].iloc[row]!r})")
        if values.isna().any():  # pandas reads an empty field, nan and NA alike
            row = int(np.argmax(values.isna().to_numpy()))
            raise ConfigError(f"{path}: column '{col}' has a missing or NaN value (row {row + 1})")
        big = ~np.isfinite(values.to_numpy(dtype=np.float64)) | (values.abs() > FLOAT32_MAX).to_numpy()
        if big.any():  # training reads float32: inf, and what float32 cannot hold, end in NaN
            row = int(np.argmax(big))
            raise ConfigError(f"{path}: column '{col}' has {beyond(values.iloc[row])} (row {row + 1}: "
                              f"{values.iloc[row]:g})")
    if len(df) < 2:
        raise ConfigError(f"{path}: needs at least 2 rows to split, has {len(df)}")
    if df.shape[1] < 2:
        raise ConfigError(f"{path}: needs at least one feature column besides '{target}'")
    x = torch.tensor(df.drop(columns=[target]).to_numpy(dtype=np.float64), dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-8)
    yv = df[target].to_numpy(dtype=np.float64)
    if np.all(yv == np.round(yv)) and len(np.unique(yv)) <= 100:
        classes, codes = np.unique(yv, return_inverse=True)
        y = torch.tensor(codes, dtype=torch.int64)
        return split(path, x, y, spec, task="ce", inputs="features", out_dim=len(classes))
    y = torch.tensor(yv, dtype=torch.float32).unsqueeze(1)
    return split(path, x, y, spec, task="mse", inputs="features", out_dim=1)


def beyond(x: float) -> str:
    return "an infinite value" if np.isinf(x) else "a value too large for float32"


@DATASETS.register("csv")
def csv(spec: RunSpec, path: str) -> Dataset:
    """A user's CSV file: numeric columns, the target column from `target` (default: last)."""
    return _table(spec, path, _read_table(path, pd.read_csv, "csv"))


@DATASETS.register("parquet")
def parquet(spec: RunSpec, path: str) -> Dataset:
    """A user's Parquet file, same rules as csv."""
    return _table(spec, path, _read_table(path, pd.read_parquet, "parquet"))
