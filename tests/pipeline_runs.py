"""What the pipeline test modules share: runs trained once per module, and the check that a
pipeline run ended where local did."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from raydist.config import RunSpec
from raydist.train import train


def quiet(rec: Any) -> None:
    pass


def run_once(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, dict], tuple[Any, RunSpec]]:
    """once(key, raw) -> (result, spec): the run of `raw` under `key`, trained the first time."""
    done: dict[str, tuple[Any, RunSpec]] = {}

    def once(key: str, raw: dict) -> tuple[Any, RunSpec]:
        if key not in done:
            spec = RunSpec.from_dict({**raw, "out": str(tmp_path_factory.mktemp(key))})
            done[key] = (train(spec, quiet), spec)
        return done[key]

    return once


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in b)


def assert_same_as_local(result: Any, reference: Any) -> None:
    diff = max_diff(result.state_dict, reference.state_dict)
    assert diff <= 1e-5, diff
    for mine, theirs in zip(result.metrics, reference.metrics, strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
        assert mine["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-5)
