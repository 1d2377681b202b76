"""Dataset registry, the deterministic train/validation split, batch order and sharding. The
registered data sets are in builtin.py; `data: mypkg.data:load` names a user's loader
(imported.py).

Every data set but a streamed one lives in memory as tensors. `x` holds float features
(images flattened) or int64 token ids; `task` says which loss the engine applies. A streamed
set (`parquet-dir:PATH`, `csv-dir:PATH`: streamed.py) reads its rows through Ray Data as the
epoch goes; the engine reaches rows only through `epoch_batches`, `rows` and `val_batches`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from raydist.registry import Registry

if TYPE_CHECKING:  # annotations only: config sits above this layer and imports it
    from raydist.config import RunSpec


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    task: str
    """'ce' (classes), 'bce' (two classes, one logit), 'mse' (regression), or the import path of
    the user's loss (`loss: mypkg.losses:fn`)."""
    inputs: str
    """'features', 'image' (features that are also an image) or 'tokens'."""
    out_dim: int
    image_shape: tuple[int, int, int] | None = None
    streamed = False
    """whether the rows stream from files (streamed.py) instead of living in these tensors"""

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    @property
    def n_val(self) -> int:
        return len(self.x_val)

    def epoch_batches(self, size: int, seed: int, epoch: int) -> list[torch.Tensor]:
        """The global batches of an epoch (here: index tensors, batch_order)."""
        return batch_order(self.n_train, size, seed, epoch)

    def rows(self, batch: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Worker `rank`'s samples of a global batch."""
        idx = shard(batch, rank, world)
        return self.x_train[idx], self.y_train[idx]

    def val_batches(self, size: int = 2048) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.x_val), size):
            yield self.x_val[i : i + size], self.y_val[i : i + size]

    def in_worker(self, shard: Callable[[str], Any]) -> Dataset:
        """The set as a ddp worker reads it (a stream: through get_dataset_shard)."""
        return self


FLOAT32_MAX = torch.finfo(torch.float32).max
"""The largest value training (float32) holds: a data value beyond it would become inf."""
Loader = Callable[["RunSpec", str], Dataset]
DATASETS: Registry[Loader] = Registry("data")
KNOBS = {"synthetic": ("samples",), "images": ("samples",), "text": ("text_chars", "seq_len"),
         **dict.fromkeys(("csv", "parquet", "csv-dir", "parquet-dir"), ("target",))}
"""The RunSpec fields each registered data set reads beyond the split's (val_fraction, seed);
a registered data set takes no data_args."""


def knobs_of(name: str) -> tuple[str, ...]:
    """The knobs registered data set `name` reads (RunSpec.refuse_unread names them)."""
    return KNOBS.get(name, ())


def load_data(spec: RunSpec) -> Dataset:
    name, _, arg = spec.data.partition(":")
    if name not in DATASETS:  # RunSpec let it through: an import path, mypkg.data:load
        from raydist.data.imported import load_imported

        data = load_imported(spec)
    else:
        data = DATASETS[name](spec, arg)
    if spec.loss is not None:  # the task names the loss (engine.loss_fn); no accuracy then
        data = dataclasses.replace(data, task=spec.loss)
    return data


def split(name: str, x: torch.Tensor, y: torch.Tensor, spec: RunSpec, **info: object) -> Dataset:
    """Deterministic split by seed: the same seed holds out the same samples."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(spec.seed))
    n_val = min(len(x) - 1, max(1, round(len(x) * spec.val_fraction)))
    val, train = perm[:n_val], perm[n_val:]
    return Dataset(name, x[train], y[train], x[val], y[val], **info)


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The global batches of one epoch: a permutation fixed by (seed, epoch), so a resumed
    run sees the same order as an uninterrupted one."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return list(torch.randperm(n, generator=g).split(batch_size))


def shard(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Worker `rank`'s contiguous part of a global batch; the parts, in rank order, are the batch."""
    return torch.tensor_split(batch, world)[rank]


from raydist.data import builtin, images, streamed  # noqa: E402,F401  (each registers its data sets)
