"""A strategy is its folder: every registered strategy's cost (raydist/strategies/<name>/cost.py)
is found through the registry, with the shared signatures and the facts `raydist plan`, the
pre-flight and the report ask of it, and the layers above the strategies name none of them."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from raydist import plan, strategies
from raydist.config import RunSpec
from raydist.memory.footprint import Layout, Sizes, Worker
from raydist.steptime import Costs, Network

pytestmark = pytest.mark.unit

NAMES = list(strategies.STRATEGIES)
# compute(b) measured at 64, 128, 256 samples (tests/test_plan.py's costs); three blocks
COSTS = Costs(batches=[64, 128, 256], step_s=[0.02, 0.03, 0.05], optimizer_s=0.002,
              workers_per_node=2, concurrency=[1, 2], slowdown=[1.0, 1.5], grad_bytes=8_000_000,
              block_share=[0.6, 0.3, 0.1], block_params=[400, 300, 300],
              block_out_bytes=[1000, 500, 4])
NET = Network(bandwidth=1e9, latency=1e-5)
# four blocks of 100 bytes of parameters, 200 of optimizer state (P + G + O = 400 per block)
SIZES = Sizes(params=[100] * 4, state=[200] * 4, out=[10] * 4, sharded=[0, 100, 100, 0],
              tensors=((100, 200),) * 4)


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_strategy_holds_its_cost_in_its_folder(name):
    strategy = strategies.get(name)
    cost = strategy.cost
    assert cost.__name__ == f"{strategy.__name__}.cost"
    step = list(inspect.signature(cost.predicted_step).parameters)
    assert step[:5] == ["c", "net", "batch", "n", "microbatches"], step
    assert list(inspect.signature(cost.worker_bytes).parameters) == ["s", "lay"]
    t = cost.predicted_step(COSTS, NET, 256, 2, 4)
    assert isinstance(t, float) and t > 0
    workers = cost.worker_bytes(SIZES, Layout(n=2, batch=64))
    assert workers and all(isinstance(w, Worker) and w.state > 0 for w in workers)
    # the facts the plan, the pre-flight and the report ask
    assert isinstance(strategy.DATA_PARALLEL, bool) and isinstance(cost.SHARDS, bool)
    assert strategy.COUNT in RunSpec.__dataclass_fields__
    assert cost.HOLDS.format(opt="adam") != cost.HOLDS  # names the optimizer's state
    # a strategy without Ray sends no messages; one on Ray names the transport plan predicts it on
    assert (cost.TRANSPORT is None) == (strategy.resources is None)


def test_at_one_worker_the_collective_strategies_cost_locals_step():
    """N = 1: no ring, no gathers, no split, slowdown 1: ddp, fsdp and tp take compute(256) =
    0.05 s, local's step (at any N: it is one process)."""
    for name in ("local", "ddp", "fsdp", "tp"):
        assert strategies.get(name).cost.predicted_step(COSTS, NET, 256, 1) == pytest.approx(0.05), name
    assert strategies.get("local").cost.predicted_step(COSTS, NET, 256, 4) == pytest.approx(0.05)


def test_the_plan_predicts_the_strategies_on_ray_grouped_by_transport():
    assert [name for name, _ in plan.planned()] == ["ddp", "fsdp", "tp", "ps", "pipeline"]


def test_a_pipelines_cuts_count_only_for_the_stages_they_make():
    """cuts (1,) make 2 stages: block 0 | blocks 1-3; at 4 stages of the 4 blocks the default cut
    holds (it divided by zero: stages 2 and 3 had no blocks)."""
    cost = strategies.get("pipeline").cost
    assert [w.state for w in cost.worker_bytes(SIZES, Layout(n=2, batch=64, cuts=(1,)))] == [400, 1200]
    assert [w.state for w in cost.worker_bytes(SIZES, Layout(n=4, batch=64, cuts=(1,)))] == [400] * 4


ABOVE_AND_BELOW = ("plan", "report", "engine", "memory", "steptime")
"""The packages that ask the strategy modules instead of naming them."""


def strategy_branches(path: Path) -> list[str]:
    """String constants naming a registered strategy as a dict key, a tuple, list or set member,
    or a side of a comparison ('local', the reference every run is compared with, aside)."""
    named = set(NAMES) - {"local"}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Dict):
            found += node.keys
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            found += node.elts
        elif isinstance(node, ast.Compare):
            found += [node.left, *node.comparators]
    return [f"{path.name}:{n.lineno} {n.value}" for n in found
            if isinstance(n, ast.Constant) and n.value in named]


def test_the_layers_around_the_strategies_name_none_of_them():
    root = Path(__file__).resolve().parents[1] / "raydist"
    found = [hit for package in ABOVE_AND_BELOW for path in sorted((root / package).rglob("*.py"))
             for hit in strategy_branches(path)]
    assert found == []
