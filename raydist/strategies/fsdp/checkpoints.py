"""fsdp's checkpoints: one folder per epoch (Ray Train's), holding
- the tensors of the model and the optimizer, sharded, through torch.distributed.checkpoint
  (DCP): each worker writes its shards (`__<rank>_0.distcp`), rank 0 the `.metadata` index;
  a resume reads back the pieces of its own shards, whatever the worker count was;
- state.pt (rank 0): everything else, plain data (raydist.engine.checkpoint): the history, the epoch,
  the lr schedule, the RNG states, the optimizer's param groups and non-tensor state.

Nothing here unpickles code. DCP stores non-tensor values as pickles (read back by an
unrestricted torch.load): none are written, and a load asks DCP only for tensors, so none are read.
The .metadata index is a pickle of DCP's own dataclasses: it is read with an unpickler that
builds those classes and nothing else (`SafeReader`), both in `check` (the pre-flight, before
Ray starts) and in the workers."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from raydist.engine import checkpoint
from raydist.errors import ConfigError

STATE = "state.pt"
METADATA = ".metadata"
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
ALLOWED = {
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # a torch.layout by its name, from a fixed table
    ("torch", "Size"), *(("torch", d) for d in DTYPES),
    ("pathlib", "PosixPath"), ("collections", "OrderedDict"),
}
"""What DCP's index is made of: exact (module, name) pairs (a dotted name would walk attributes)."""


class _Index(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")
        return super().find_class(module, name)


def read_index(path: Path) -> Any:
    """DCP's Metadata from `path`, building DCP's own classes only."""
    return _Index(io.BytesIO(path.read_bytes())).load()


def check(folder: Path) -> None:
    """ConfigError unless `folder` is an fsdp checkpoint raydist wrote: plain state.pt, an index
    of DCP's classes only."""
    checkpoint.load(folder / STATE)
    index = folder / METADATA
    try:
        read_index(index)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise ConfigError(f"out: {index} is not a checkpoint index raydist wrote ({e}); choose "
                          "another out") from None


def split(optim: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An optimizer state_dict (get_state_dict's: keyed by parameter name) as (its tensors, for
    DCP; the rest, plain data for state.pt)."""
    tensors = {n: {k: v for k, v in st.items() if isinstance(v, torch.Tensor)}
               for n, st in optim["state"].items()}
    rest = {n: {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
            for n, st in optim["state"].items()}
    return tensors, {"state": rest, "param_groups": optim["param_groups"]}


def join(tensors: dict[str, Any], rest: dict[str, Any]) -> dict[str, Any]:
    state = {n: {**tensors.get(n, {}), **rest["state"].get(n, {})}
             for n in {*tensors, *rest["state"]}}
    return {"state": state, "param_groups": rest["param_groups"]}


def save(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         plain: dict[str, Any] | None) -> None:
    """Every rank: its shards into `folder` (collective); `plain` (rank 0's): state.pt beside."""
    msd, osd = get_state_dict(model, optimizer)
    tensors, rest = split(osd)
    dcp.save({"model": msd, "optimizer": tensors}, storage_writer=dcp.FileSystemWriter(str(folder)))
    if plain is not None:
        checkpoint.save(folder / STATE, {**plain, "optimizer": rest})


def load(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every rank: its shards of the model and optimizer from `folder` (resharded if it was
    written by another worker count); returns state.pt's plain data."""
    plain = checkpoint.load(folder / STATE)
    msd, osd = get_state_dict(model, optimizer)  # the shapes to read into (a fresh state: zeros)
    tensors, _ = split(osd)
    wanted = {"model": msd, "optimizer": tensors}
    dcp.load(wanted, storage_reader=SafeReader(str(folder)))
    set_state_dict(model, optimizer, model_state_dict=wanted["model"],
                   optim_state_dict=join(wanted["optimizer"], plain["optimizer"]))
    return plain


class SafeReader(dcp.FileSystemReader):
    """DCP's reader, its index read by `read_index` instead of pickle.load."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        metadata = read_index(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
