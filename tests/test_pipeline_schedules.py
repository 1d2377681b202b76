"""Pipeline schedules without Ray: interleaved 1F1B and ZB-H1 in their papers' orders, every
schedule free of deadlock over many shapes, the ideal bubbles against their closed forms, and
the settings a schedule cannot run refused with the numbers."""

from __future__ import annotations

import pytest

from raydist.config import ConfigError, RunSpec
from raydist.data import load_data
from raydist.strategies import pipeline
from raydist.strategies.pipeline.schedules import (
    SCHEDULES,
    Deadlock,
    bubble_bound,
    idle_share,
    interleaved_1f1b,
    micro_count,
    simulate,
    zb_h1,
)

pytestmark = pytest.mark.unit


def F(i, c=0):
    return ("F", i, c)


def B(i, c=0):
    return ("B", i, c)


def W(i, c=0):
    return ("W", i, c)


def test_interleaved_1f1b_runs_megatrons_order():
    # K = 2, V = 2, M = 4: groups of K micro-batches pass chunk 0, then chunk 1; stage k warms
    # up with 2(K-k-1) + (V-1)K forwards; backwards run the chunks in reverse
    assert interleaved_1f1b(0, 2, 4, 2) == [
        F(0), F(1), F(0, 1), F(1, 1), F(2), B(0, 1), F(3), B(1, 1), F(2, 1), B(0), F(3, 1), B(1),
        B(2, 1), B(3, 1), B(2), B(3)]
    assert interleaved_1f1b(1, 2, 4, 2) == [
        F(0), F(1), F(0, 1), B(0, 1), F(1, 1), B(1, 1), F(2), B(0), F(3), B(1), F(2, 1), B(2, 1),
        F(3, 1), B(3, 1), B(2), B(3)]


def test_zb_h1_defers_each_stages_weight_passes_by_its_index():
    # 1F1B's ops, each backward split in two; the last stage sends its input gradients
    # upstream first and fills the cool-down with its weight passes
    assert zb_h1(0, 2, 3) == [F(0), F(1), B(0), W(0), F(2), B(1), W(1), B(2), W(2)]
    assert zb_h1(1, 2, 3) == [F(0), B(0), F(1), B(1), W(0), F(2), B(2), W(1), W(2)]


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_every_schedule_finishes_and_runs_each_op_once(schedule):
    entry = SCHEDULES[schedule]
    kinds = {"F", "B", "W"} if entry.split_backward else {"F", "B"}
    for k in range(1, 7):
        for v in (1, 2, 3, 4) if entry.interleaved else (1,):
            for m in range(1, 3 * k + 1):
                n = micro_count(schedule, k, m, m)
                timeline = simulate(schedule, k, n, v)  # raises Deadlock
                for ops in timeline:
                    assert sorted(op[:3] for op in ops) == sorted((kind, i, c) for kind in kinds
                                                                 for i in range(n) for c in range(v))


def test_a_partial_group_can_deadlock_interleaved_1f1b_so_short_batches_run_whole_groups():
    with pytest.raises(Deadlock):
        simulate("interleaved-1f1b", 4, 5, 3)
    assert micro_count("interleaved-1f1b", 4, 8, 5) == 4  # a short batch of 5 samples: one group
    assert micro_count("interleaved-1f1b", 4, 8, 3) == 3  # fewer than K: no group to break
    assert micro_count("1f1b", 4, 8, 5) == 5


@pytest.mark.parametrize("schedule,k,m,v,bubble", [
    ("gpipe", 2, 4, 1, 1 / 5), ("1f1b", 4, 8, 1, 3 / 11),           # (K-1)/(M+K-1)
    ("interleaved-1f1b", 2, 4, 2, 1 / 9), ("interleaved-1f1b", 4, 8, 2, 3 / 19),  # (K-1)/(VM+K-1)
    ("interleaved-1f1b", 4, 8, 4, 3 / 35),
    # ZB-H1, F = B = W: 1F1B's bubble of (K-1)(F+B+W) per stage shrinks to (K-1)(F+B-W)
    ("zb-h1", 2, 4, 1, 1 / 13), ("zb-h1", 4, 8, 1, 3 / 27),
])
def test_ideal_bubble_of_each_schedule_and_its_bound_in_the_record(schedule, k, m, v, bubble):
    assert idle_share(simulate(schedule, k, m, v)) == pytest.approx(bubble)
    assert bubble_bound(schedule, k, m, v) == pytest.approx(bubble)


def spec(**raw):
    return RunSpec.from_dict({"strategy": "pipeline", "model": "mlp", "epochs": 1, **raw})


@pytest.mark.parametrize("raw,message", [
    ({"schedule": "interleaved-1f1b", "stages": 2},  # hidden [64]: 2 blocks
     "virtual_stages: got 2 with stages 2: interleaved-1f1b cuts the model into stages x virtual_stages "
     "= 4 chunks, but model 'mlp' has only 2 blocks; expected stages x virtual_stages <= 2"),
    ({"schedule": "interleaved-1f1b", "stages": 2, "virtual_stages": 3, "hidden": [8, 8, 8]},
     "virtual_stages: got 3 with stages 2: interleaved-1f1b cuts the model into stages x virtual_stages "
     "= 6 chunks, but model 'mlp' has only 4 blocks; expected stages x virtual_stages <= 4"),
    ({"schedule": "1f1b", "virtual_stages": 2},
     "virtual_stages: got 2, but schedule '1f1b' runs one chunk per stage actor; expected 1, or "
     "schedule interleaved-1f1b"),
    ({"schedule": "interleaved-1f1b", "stages": 2, "microbatches": 3, "hidden": [8, 8, 8]},
     "microbatches: got 3; interleaved-1f1b runs micro-batches in groups of stages (2): expected a "
     "multiple of 2"),
    ({"schedule": "interleaved-1f1b", "stages": 2, "cuts": [2], "hidden": [8, 8, 8]},
     "cuts: got [2]; expected 3 block indices (stages x virtual_stages - 1) for stages=2, "
     "virtual_stages=2"),
    ({"replicas": 2, "microbatches": 40, "batch_size": 64},
     "microbatches: got 40 x replicas 2, more than the global batch of 64 samples; expected at most 32"),
])
def test_settings_a_schedule_cannot_run_are_refused_with_the_numbers(raw, message):
    s = spec(**raw)
    with pytest.raises(ConfigError) as err:
        pipeline.check(s, load_data(s))
    assert str(err.value) == message


def test_interleaved_cuts_name_where_chunks_start():
    s = spec(schedule="interleaved-1f1b", stages=2, cuts=[1, 2, 3], hidden=[8, 8, 8])
    pipeline.check(s, load_data(s))  # 3 cuts: 4 chunks, one block each


def test_replicas_ask_for_an_actor_each():
    assert pipeline.resources(spec(stages=2, replicas=3, threads_per_worker=2), 0) == (
        12, 0.0, "pipeline (3 replicas x 2 stages x 2 threads)")
    assert pipeline.resources(spec(stages=2, replicas=2), 2)[1] == 4 * 0.5  # 2 GPUs, 4 actors
