"""The cost model against this machine: measure its inputs (the engine's loop alone and two at
once, loopback transports) and the step times of ddp, ps sync and pipeline at 1 and 2
workers/stages, all in one run; write them to bench/results/plan_check.json and print each
prediction of raydist plan's formulas beside the measured step time.

    .venv/bin/python bench/plan_check.py --reps 5

Inputs are measured apart from the runs they predict, with Ray up (its processes take their
share of the CPUs in the runs too) and at the niceness Ray gives its workers, once per round
beside the runs (so load drifting on a shared machine hits both alike; each input is the median
over the rounds): calibration.calibrate times the engine's epoch loop at every batch size the
runs use, and c copies of it at once in c processes; the transports are fitted to t(S) =
latency + S / bandwidth from a small and a full-size message each, measured between two Ray
actors as the workers and stages are: a gloo all-reduce (ddp's ring); gloo send/recv between
two actors running 2-stage GPipe's traffic with each forward and backward replaced by computing
for the time the model predicts for it (pipeline stages' activations and gradients: gloo moves
a message only when its receiver asks, and the sender is then mid-compute; per message, the
step's time beyond the schedule's compute, bench/peers/gloo_p2p.py); an array returned by one
actor's task and copied by another's (ps: gradients up, weights down). Each run trains EPOCHS
epochs and its step time is the median over the epochs after WARMUP_EPOCHS (step times settle
over the first two or three epochs).
tests/test_plan.py recomputes every prediction from the committed json.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time
from typing import Any

import common
import numpy as np
import ray
import torch
import torch.distributed as dist

from raydist import plan, strategies
from raydist.config import RunSpec
from raydist.plan import calibration
from raydist.runtime import connect
from raydist.strategies.pipeline import cost as pipeline_cost

OUT = common.BENCH_DIR / "results" / "plan_check.json"
MICROBATCHES = 8
EPOCHS, WARMUP_EPOCHS = 5, 2
PEERS = str(common.BENCH_DIR / "peers")
RUNS = {  # name: (strategy, N, spec changes)
    "ddp 1": ("ddp", 1, {"workers": 1}), "ddp 2": ("ddp", 2, {"workers": 2}),
    "ps 1": ("ps", 1, {"workers": 1, "mode": "sync"}), "ps 2": ("ps", 2, {"workers": 2, "mode": "sync"}),
    "pipeline 1": ("pipeline", 1, {"stages": 1}), "pipeline 2": ("pipeline", 2, {"stages": 2}),
}


def fit_line(sizes: list[int], times: list[float], hops: float) -> dict[str, float]:
    """latency, bandwidth from t = hops * latency + S / bandwidth at two sizes."""
    (s0, s1), (t0, t1) = sizes, times
    bandwidth = (s1 - s0) / max(t1 - t0, 1e-9)
    return {"latency": max(t0 - s0 / bandwidth, 0.0) / hops, "bandwidth": bandwidth}


@ray.remote(num_cpus=0)
class GlooPeer:
    """One of two Ray actors (as workers and stages are) in a gloo group of their own."""

    def port(self) -> int:
        return connect.free_port("127.0.0.1")

    def measure(self, script: str, rank: int, port: int, sizes: list[int], **kwargs: Any
                ) -> dict[int, float]:
        sys.path.insert(0, PEERS)
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        try:
            return importlib.import_module(script).measure(sizes, **kwargs)
        finally:
            dist.destroy_process_group()


def gloo(script: str, sizes: list[int], **kwargs: Any) -> list[float]:
    """bench/peers/SCRIPT's `measure` in two fresh actors: rank 0's seconds per size."""
    peers = [GlooPeer.remote(), GlooPeer.remote()]
    port = ray.get(peers[0].port.remote())
    try:
        out = ray.get([p.measure.remote(script, r, port, sizes, **kwargs) for r, p in enumerate(peers)],
                      timeout=600)[0]
    finally:
        for p in peers:
            ray.kill(p)
    return [out[s] for s in sizes]


@ray.remote(num_cpus=0)
class Peer:
    def make(self, size: int) -> np.ndarray:
        return np.ones(size // 4, dtype=np.float32)

    def bounce(self, a: np.ndarray) -> np.ndarray:
        return a.copy()


def object_store(sizes: list[int], hops: int = 40) -> list[float]:
    """An array returned by one actor's task, read and copied by the next task of another actor,
    which returns its copy (a ps replica copies the weights in and returns gradients; a server
    sums the gradients and returns weights): seconds per hop."""
    peers = [Peer.remote(), Peer.remote()]
    times = []
    for size in sizes:
        ref = peers[0].make.remote(size)
        for _ in range(4):  # warm-up
            ref = peers[1].bounce.remote(peers[0].bounce.remote(ref))
        ray.get(ref)
        t = time.perf_counter()
        for i in range(hops):
            ref = peers[i % 2].bounce.remote(ref)
        ray.get(ref)
        times.append((time.perf_counter() - t) / hops)
    for p in peers:
        ray.kill(p)
    return times


def cut_bytes(costs: calibration.Costs, batch: int) -> int:
    """What crosses the 2-stage cut per micro-batch."""
    cut = pipeline_cost.balanced_bounds(costs, 2)[1]
    return -(-batch // MICROBATCHES) * costs.block_out_bytes[cut - 1]


FORWARD_SHARE = 1 / 3
"""Of a micro-batch's forward + backward, the forward's (a backward costs about two forwards)."""


def stage_ms(costs: calibration.Costs, batch: int) -> dict[str, list[float]]:
    """Each of 2 stages' forward and backward of one micro-batch, as the model predicts them:
    what the p2p measurement computes between messages."""
    t = [ms * 1e3 for ms in pipeline_cost.stage_times(costs, batch, 2, MICROBATCHES)]
    return {"forward_ms": [FORWARD_SHARE * x for x in t],
            "backward_ms": [(1 - FORWARD_SHARE) * x for x in t]}


HOPS = {"allreduce": 2, "p2p": 1, "object_store": 1}
"""Latencies in one measured message: a 2-rank ring all-reduce pays two."""


@ray.remote(num_cpus=0)
def worker_niceness() -> int:
    return os.nice(0)


def measure_inputs(base: RunSpec, seconds: float, niceness: int) -> dict:
    """One round of the model's inputs: Costs (calibrated at the niceness of Ray's workers) and,
    per transport, {bytes: seconds}."""
    costs = calibration.calibrate(base, [1, 2], seconds=seconds, niceness=niceness)
    sizes = {"allreduce": [4096, costs.grad_bytes], "p2p": [4096, cut_bytes(costs, base.batch_size)],
             "object_store": [4096, costs.grad_bytes]}
    times = {"allreduce": gloo("gloo_allreduce", sizes["allreduce"]),
             "p2p": gloo("gloo_p2p", sizes["p2p"], microbatches=MICROBATCHES,
                         **stage_ms(costs, base.batch_size)),
             "object_store": object_store(sizes["object_store"])}
    return {"costs": costs, "transports": {k: dict(zip(sizes[k], times[k], strict=True)) for k in sizes}}


def median_costs(rounds: list[calibration.Costs]) -> calibration.Costs:
    """Field by field (element by element), the median over rounds of what was timed."""
    def med(values: list) -> object:
        if isinstance(values[0], list):
            return [med(list(col)) for col in zip(*values, strict=True)]
        return common.median(values) if isinstance(values[0], float) else values[0]

    return calibration.Costs(**{f.name: med([getattr(c, f.name) for c in rounds])
                         for f in dataclasses.fields(calibration.Costs)})


def networks(rounds: list[dict]) -> dict[str, dict[str, float]]:
    """Each transport fitted to the median time of each message size over the rounds."""
    out = {}
    for name, hops in HOPS.items():
        sizes = list(rounds[0]["transports"][name])
        out[name] = fit_line(sizes, [common.median([r["transports"][name][s] for r in rounds])
                                     for s in sizes], hops)
    return out


def epoch_times(spec: RunSpec) -> list[float]:
    return [r["epoch_time_s"] for r in common.raydist_records(spec)[WARMUP_EPOCHS:]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0, help="calibration time per batch size")
    args = p.parse_args()
    base = common.spec(microbatches=MICROBATCHES, epochs=EPOCHS)
    steps = common.samples(base) // base.batch_size
    common.start_ray()
    rounds: list[dict] = []
    niceness = ray.get(worker_niceness.remote())

    def inputs() -> list[float]:
        rounds.append(measure_inputs(base, args.seconds, niceness))
        return []

    specs = {name: base.replace(strategy=s, **changes) for name, (s, _, changes) in RUNS.items()}
    variants = {"inputs": inputs, **{name: (lambda s=s: epoch_times(s)) for name, s in specs.items()}}
    times = common.alternate(variants, args.reps)
    ray.shutdown()
    kept = rounds[1:]  # round 0 warms up
    measured = [{"run": name, "strategy": RUNS[name][0], "n": RUNS[name][1],
                 "step_s": common.median(times[name]) / steps} for name in RUNS]
    result = {"machine": common.machine(), "command": f"bench/plan_check.py --reps {args.reps}",
              "worker_niceness": niceness, "batch_size": base.batch_size, "microbatches": MICROBATCHES,
              "costs": dataclasses.asdict(median_costs([r["costs"] for r in kept])),
              "networks": networks(kept), "measured": measured}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(compare(result))


def predictions(result: dict) -> list[tuple[dict, float]]:
    """(measured run, predicted step time) from the inputs recorded in `result`."""
    costs = calibration.Costs(**result["costs"])
    cost = {run["strategy"]: strategies.get(run["strategy"]).cost for run in result["measured"]}
    return [(run, cost[run["strategy"]].predicted_step(
                costs, plan.Network(**result["networks"][cost[run["strategy"]].TRANSPORT]),
                result["batch_size"], run["n"], result["microbatches"]))
            for run in result["measured"]]


def compare(result: dict) -> str:
    """Predicted against measured step time, per run."""
    rows = [[run["run"], t * 1e3, run["step_s"] * 1e3, t / run["step_s"]]
            for run, t in predictions(result)]
    return common.markdown(["run", "predicted ms", "measured ms", "predicted / measured"], rows)


if __name__ == "__main__":
    main()
