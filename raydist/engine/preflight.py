"""The one pre-flight, before any training starts or any folder is made, in this order: the
spec (validated when it was built), the data and the model, what the strategy needs (knobs it
does not read are refused by name), the memory each worker would hold under memory_per_worker,
the output folder, whether a run already in that folder
may be resumed by this spec (and its checkpoints hold plain data only), and last the cluster's
capacity: asking a cluster costs a Ray start (seconds on a laptop), so every check that needs
none comes first. Every failure is a ConfigError: one line naming the field or file."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch
import yaml
from torch import nn

from raydist.config import ConfigError, RunSpec
from raydist.config.resume import pinned, resumable
from raydist.config.run import KNOBS, default_of
from raydist.config.values import cluster_address, parse_size
from raydist.data import Dataset, load_data
from raydist.engine.step import loss_fn, step_samples
from raydist.memory import footprint, gib
from raydist.models import build_model
from raydist.models.imported import first_line
from raydist.optim import OPTIMIZERS
from raydist.strategies import STRATEGIES, get

SPEC_FILE = "spec.yaml"


def preflight(spec: RunSpec, strategy: ModuleType) -> Dataset:
    """Check `spec` for `strategy` (a module of raydist.strategies); returns the data set."""
    if strategy.resources is not None:  # a Ray strategy reads RAY_ADDRESS: checked as the knob is
        cluster_address(spec.address)
    with memory_for("data", f"'{spec.data}'"):
        data = load_data(spec)
    with memory_for("model", f"'{spec.model}' for data '{spec.data}'"):
        model = build_model(spec, data)
    check_output(model, data, spec)
    spec.refuse_unread()
    check_stream(spec, data, strategy)
    strategy.check(spec, data)
    check_accumulation(spec, data)
    check_memory(spec, model, data, strategy)
    check_out(spec.out)
    if strategy.RESUMES:
        check_resumable(spec, Path(spec.out) / SPEC_FILE)
        strategy.check_saved(spec)  # its checkpoints hold plain data (and are not past spec.epochs)
    if strategy.resources is not None:  # a Ray strategy: join (or start) Ray, measure it
        from raydist.runtime import capacity, connect  # imports Ray: the engine itself imports without it

        cpus, _, what = strategy.resources(spec, 0.0)  # an embedded Ray is sized to this
        connect.connect(spec, cpus, what)
        capacity.require(*strategy.resources(spec, connect.gpus_now()))
    return data


@contextmanager
def memory_for(field: str, what: str) -> Iterator[None]:
    """A size knob too large for this machine (--samples, --hidden, --d-model ...): torch's CPU
    allocator fails at once, with a RuntimeError (no type of its own) that says so."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "can't allocate memory" not in str(e):
            raise
        size = re.search(r"allocate (\d+) bytes", str(e))
        asked = f" ({int(size[1]):.2g} bytes at once)" if size else ""
        raise ConfigError(f"{field}: {what} needs more memory than this machine has{asked}; "
                          "make it smaller") from None


def check_stream(spec: RunSpec, data: Dataset, strategy: ModuleType) -> None:
    """A streamed data set (data/streamed.py) goes to the strategies that read one (STREAMS),
    in batches: gd's one batch of the whole training set would hold it all in memory."""
    if not data.streamed:
        return
    if not getattr(strategy, "STREAMS", False):
        *others, last = streaming_strategies()
        raise ConfigError(f"data: {spec.data} is streamed through Ray Data, which {spec.strategy} does "
                          f"not read; use strategy {', '.join(others)} or {last}, or a parquet:FILE "
                          "that fits in memory")
    if OPTIMIZERS[spec.optimizer].full_batch:
        raise ConfigError(f"optimizer: {spec.optimizer} takes the whole training set as one batch, "
                          f"which a streamed data set ({spec.data}) never holds; use sgd or another")


def streaming_strategies() -> list[str]:
    """The registered strategies that read a stream (their STREAMS), by name."""
    return [name for name in STRATEGIES if getattr(get(name), "STREAMS", False)]


def check_accumulation(spec: RunSpec, data: Dataset) -> None:
    """grad_accum_steps cuts each worker's share of a global batch into micro-batches of at
    least one sample (an epoch's shorter last batch may leave some empty: they add nothing)."""
    batch, replicas = step_samples(spec, data), spec.data_parallel
    share = batch // replicas
    if spec.grad_accum_steps > share:
        over = f"{batch} over {replicas} data-parallel replica{'s' if replicas > 1 else ''}"
        raise ConfigError(f"grad_accum_steps: got {spec.grad_accum_steps}, but a worker's share of "
                          f"each global batch is {share} samples ({over}), and each micro-step needs "
                          f"one; expected at most {share}")


def check_memory(spec: RunSpec, model: nn.Module, data: Dataset, strategy: ModuleType) -> None:
    """Under `memory_per_worker`, a strategy whose worst worker is predicted to hold more model
    state than that (its cost.worker_bytes, as `raydist plan` predicts it) is refused."""
    if spec.memory_per_worker is None:
        return
    sizes = footprint.sizes_of(model, spec.model, spec.optimizer, data.x_train[:1])
    budget = parse_size(spec.memory_per_worker)
    worst = footprint.worst(strategy.cost.worker_bytes(sizes, footprint.Layout.of(spec, strategy.COUNT)))
    if worst is None or worst.state <= budget:
        return
    holds = strategy.cost.HOLDS.format(opt=spec.optimizer)
    raise ConfigError(f"memory_per_worker: {spec.strategy} needs {gib(worst.state)} per worker ({holds}), "
                      f"budget {gib(budget)}; {shard_hint(strategy)}")


def shard_hint(strategy: ModuleType) -> str:
    """What would split the model state: more of the strategy's own workers, or else the
    strategies that shard it (those counting the same knob as this one first)."""
    if strategy.cost.SHARDS:
        return f"more {strategy.COUNT} shard it further"
    others = sorted(((name, get(name)) for name in STRATEGIES), key=lambda o: o[1].COUNT != strategy.COUNT)
    names = [name for name, other in others if other.cost.SHARDS]
    return f"{' or '.join([', '.join(names[:-1]), names[-1]] if len(names) > 1 else names)} shard it"


def check_out(out: str) -> None:
    """`out` is a folder that exists and is writable, or can be created."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out: {out} is a file; expected a folder (created if missing)")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"out: cannot create {out}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise ConfigError(f"out: {out} {what}")


def check_resumable(spec: RunSpec, saved: Path) -> None:
    """A run resumed with other training settings would silently splice two runs together:
    only the knobs marked resumable for its strategy (where and how fast it runs) may change."""
    if not saved.is_file():
        return
    try:
        old = yaml.safe_load(saved.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"out: {saved} cannot be read ({type(e).__name__}); choose another out") from None
    if not isinstance(old, dict):
        raise ConfigError(f"out: {saved} holds no run spec; choose another out")
    strategy = old.get("strategy", spec.strategy)
    allowed, fixed = resumable(spec.strategy, spec), pinned(spec)
    for key, value in spec.to_dict().items():
        # a knob the saved spec predates held its default there
        was = old.get(key, default_of(KNOBS[key]))
        if key in allowed or was == value:
            continue
        held = f"{key}: got {value!r}, but {spec.out} holds a {strategy} run with {key}={was!r}"
        if key in fixed:
            raise ConfigError(f"{held}, and {fixed[key]}; resume it with {key}={was!r} or choose "
                              "another out")
        raise ConfigError(f"{held}; resume it with the same settings (only {', '.join(allowed)} "
                          "may change) or choose another out")


@torch.no_grad()
def check_output(model: nn.Module, data: Dataset, spec: RunSpec) -> None:
    """The model's output on two training samples fits the data's loss (eval mode: nothing of
    the model changes)."""
    x, y = data.x_train[:2], data.y_train[:2]
    was = model.training
    model.eval()
    try:
        out = model(x)
    except Exception as e:  # noqa: BLE001 - the user's forward
        raise ConfigError(f"model: {spec.model}'s forward on 2 samples of data '{spec.data}' (input "
                          f"shape {tuple(x.shape)}) raised {type(e).__name__}: {first_line(e)}") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"model: {spec.model}'s forward returned {type(out).__name__}; expected a tensor")
    if data.task in ("ce", "bce", "mse"):
        want = (*y.shape, data.out_dim) if data.task == "ce" else tuple(y.shape)
        if tuple(out.shape) != want:
            what = (f"{data.out_dim} classes" if data.task == "ce" else
                    f"targets of shape {tuple(y.shape[1:])}")
            raise ConfigError(f"model: {spec.model}'s output for 2 samples has shape {tuple(out.shape)}; "
                              f"data '{spec.data}' needs {want} ({what}, task {data.task})")
    fn = loss_fn(data.task)  # a user's loss that cannot be imported says so itself
    try:
        loss = fn(out, y)
    except Exception as e:  # noqa: BLE001 - the user's loss
        raise ConfigError(f"loss: {data.task} raised {type(e).__name__} on the model's output: "
                          f"{first_line(e)}") from None
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
        raise ConfigError(f"loss: {data.task} returned {type(loss).__name__}; expected a scalar tensor "
                          "(the sum over the batch's samples)")
