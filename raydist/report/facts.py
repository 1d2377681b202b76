"""What the report asks of a strategy, by the name a results or plan table holds: the strategy
module's own attributes (raydist.strategies), so the report names no strategy. A name no
strategy is registered under (a table from an older raydist) gets the plainest answer."""

from __future__ import annotations

from raydist import strategies


def data_parallel(name: object) -> bool:
    """Whether its N workers each train on 1/N of every batch (DATA_PARALLEL): what the
    machine's compute bound measures."""
    return name in strategies.STRATEGIES and strategies.get(str(name)).DATA_PARALLEL


def count_of(name: object) -> str:
    """The knob that counts its workers (COUNT: a pipeline's stages), 'workers' if unknown."""
    return strategies.get(str(name)).COUNT if name in strategies.STRATEGIES else "workers"
