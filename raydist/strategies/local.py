"""`local`: one process, the reference every other strategy is checked against."""

from __future__ import annotations

import torch

from raydist.config import RunSpec
from raydist.data import Dataset
from raydist.engine import Report, RunResult, fit, setup


def check(spec: RunSpec, data: Dataset) -> None:
    """Nothing beyond the spec's own validation."""


def run(spec: RunSpec, report: Report) -> RunResult:
    torch.set_num_threads(spec.threads_per_worker)
    data, model, optimizer = setup(spec)
    history = fit(spec, data, model, optimizer, report)
    return RunResult(history, model.state_dict())
