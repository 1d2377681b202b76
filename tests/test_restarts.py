"""How an actor strategy counts restarts (raydist/engine/loop.py): actors that die before they
start (e.g. placed on a node that is dead but not yet declared so) are retried START_RETRIES
times and do not use up max_failures, which counts deaths while training."""

from __future__ import annotations

import pytest

from raydist.engine.loop import START_RETRIES, Restarts

pytestmark = pytest.mark.unit


class Failed(RuntimeError):
    pass


def test_deaths_before_start_are_retried_apart_from_max_failures():
    restarts = Restarts("pipeline", 1, Failed)
    for _ in range(START_RETRIES):
        restarts.before_start(ConnectionError())
    restarts.while_training(ConnectionError())  # the one restart max_failures=1 allows
    with pytest.raises(Failed, match=rf"^pipeline: actors died before they started, "
                                     rf"{START_RETRIES + 1} times \(ConnectionError\)$"):
        restarts.before_start(ConnectionError())
    with pytest.raises(Failed, match=r"^pipeline: an actor died \(ConnectionError\) and "
                                     r"max_failures=1 restarts are used up$"):
        restarts.while_training(ConnectionError())
