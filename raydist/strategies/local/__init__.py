"""`local`: one process, the reference every other strategy is checked against."""

from __future__ import annotations

import torch

from raydist import memory
from raydist.config import RunSpec
from raydist.data import Dataset, load_data
from raydist.engine import (
    Record,
    Report,
    RunResult,
    evaluate,
    fit,
    levers,
    make_optimizer,
    make_scheduler,
    total_steps,
    train_epoch,
)
from raydist.engine.progress import steps
from raydist.models import build_model
from raydist.optim import training
from raydist.strategies.local import cost  # noqa: F401 - its step time and bytes: strategy.cost

RESUMES = False
"""A local run starts afresh: it keeps no checkpoint."""
DATA_PARALLEL = True
"""The report sets its rows beside the machine's compute bound at N = 1 (its one process
trains on every batch whole)."""
COUNT = "workers"
"""The knob that counts its workers (processes): N in `raydist plan`, its predicted bytes
and the report."""
STREAMS = True
"""It reads a streamed data set (data/streamed.py) through Ray Data in this process."""
resources = None
"""It runs in this process, without Ray."""


def check(spec: RunSpec, data: Dataset) -> None:
    """Nothing beyond the spec's own validation."""


class Local:
    """The engine's step over whole global batches, in this process."""

    def __init__(self, spec: RunSpec, data: Dataset) -> None:
        self.spec, self.data = spec, data
        self.model = levers.apply(build_model(spec, data), spec)
        self.levers = levers.Levers.of(spec)
        self.optimizer = make_optimizer(spec, self.model.named_parameters())
        self.scheduler = make_scheduler(spec, self.optimizer, total_steps(spec, data))

    def train_epoch(self, epoch: int, batches: list[torch.Tensor]) -> tuple[float, Record]:
        with training(self.spec.optimizer, self.optimizer):
            loss = train_epoch(self.model, self.optimizer, self.data, steps(batches, epoch),
                               scheduler=self.scheduler, levers=self.levers)
        # after the steps: the gradients of the last one are still held, as at every step
        held = memory.record_fields({"rank 0": memory.measure(self.model, self.optimizer)})
        return loss, {**self.levers.take(), **held}

    def evaluate(self) -> Record:
        return evaluate(self.model, self.data, levers=self.levers)

    def save(self, history: list[Record]) -> None:
        pass


def run(spec: RunSpec, report: Report) -> RunResult:
    torch.set_num_threads(spec.threads_per_worker)
    data = load_data(spec)
    if data.streamed:  # read through Ray Data, on an embedded Ray unless one runs here already
        import ray

        from raydist.runtime import connect

        if not ray.is_initialized():
            connect.start_local(log_to_driver=False)
    trainer = Local(spec, data)
    return RunResult(fit(spec, data, trainer, report), trainer.model.state_dict())
