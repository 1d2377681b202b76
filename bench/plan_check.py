"""The cost model against this machine: measure its inputs (compute per sample, loopback
transports) and the step times of ddp, ps sync and pipeline at 1 and 2 workers/stages, all
in one run; write them to bench/results/plan_check.json and print each prediction of
raydist plan's formulas beside the measured step time.

    .venv/bin/python bench/plan_check.py --reps 5

Transports are measured apart from the runs they predict: a gloo all-reduce under torchrun
(ddp's ring) and an array passed between two actors through the object store (ps and pipeline).
Each is fitted to t(S) = latency + S / bandwidth from a small and a full-size message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import common
import numpy as np
import ray

from raydist import plan

OUT = common.BENCH_DIR / "results" / "plan_check.json"
MICROBATCHES = 8
RUNS = {  # name: (strategy, N, spec changes)
    "ddp 1": ("ddp", 1, {"workers": 1}), "ddp 2": ("ddp", 2, {"workers": 2}),
    "ps 1": ("ps", 1, {"workers": 1, "mode": "sync"}), "ps 2": ("ps", 2, {"workers": 2, "mode": "sync"}),
    "pipeline 1": ("pipeline", 1, {"stages": 1, "microbatches": MICROBATCHES}),
    "pipeline 2": ("pipeline", 2, {"stages": 2, "microbatches": MICROBATCHES}),
}


def fit_line(sizes: list[int], times: list[float], hops: float) -> dict[str, float]:
    """latency, bandwidth from t = hops * latency + S / bandwidth at two sizes."""
    (s0, s1), (t0, t1) = sizes, times
    bandwidth = (s1 - s0) / max(t1 - t0, 1e-9)
    return {"latency": max(t0 - s0 / bandwidth, 0.0) / hops, "bandwidth": bandwidth}


def gloo_network(grad_bytes: int) -> dict[str, float]:
    """2-rank ring: t = S / B + 2 latency."""
    sizes = [4096, grad_bytes]
    r = common.torchrun("gloo_allreduce.py", 2, ["--bytes", ",".join(map(str, sizes))])
    return fit_line(sizes, [r[str(s)] for s in sizes], hops=2)


@ray.remote(num_cpus=0)
class Sink:
    def take(self, a: np.ndarray) -> int:
        return a.nbytes


def object_store_network(big: int, repeats: int = 30) -> dict[str, float]:
    """A numpy array put by one process and read by an actor: t = latency + S / B."""
    sink = Sink.remote()
    sizes, times = [4096, big], []
    for size in sizes:
        a = np.ones(size // 4, dtype=np.float32)
        ray.get(sink.take.remote(ray.put(a)))
        samples = []
        for _ in range(repeats):
            t = time.perf_counter()
            ray.get(sink.take.remote(ray.put(a)))
            samples.append(time.perf_counter() - t)
        times.append(common.median(samples))
    ray.kill(sink)
    return fit_line(sizes, times, hops=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    base = common.spec()
    costs = plan.calibrate(base, repeats=20)
    steps = common.samples(base) // base.batch_size
    common.start_ray()
    nets = {"gloo": gloo_network(costs.grad_bytes), "object_store": object_store_network(costs.grad_bytes)}
    specs = {name: common.spec(strategy=s, **changes) for name, (s, _, changes) in RUNS.items()}
    times = common.alternate({name: (lambda s=s: common.steady(common.raydist_records(s)))
                              for name, s in specs.items()}, args.reps)
    ray.shutdown()
    measured = [{"run": name, "strategy": RUNS[name][0], "n": RUNS[name][1],
                 "step_s": common.median(t) / steps} for name, t in times.items()]
    result = {"machine": common.machine(), "command": f"bench/plan_check.py --reps {args.reps}",
              "batch_size": base.batch_size, "microbatches": MICROBATCHES,
              "costs": dataclasses.asdict(costs), "networks": nets, "measured": measured}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(compare(result))


TRANSPORT = {"ddp": "gloo", "ps": "object_store", "pipeline": "object_store"}


def compare(result: dict) -> str:
    """Predicted against measured step time, per run."""
    costs = plan.Costs(**result["costs"])
    rows = []
    for run in result["measured"]:
        net = plan.Network(**result["networks"][TRANSPORT[run["strategy"]]])
        predicted = plan.STEPS[run["strategy"]](costs, net, result["batch_size"], run["n"],
                                                result["microbatches"])
        rows.append([run["run"], predicted * 1e3, run["step_s"] * 1e3, predicted / run["step_s"]])
    return common.markdown(["run", "predicted ms", "measured ms", "predicted / measured"], rows)


if __name__ == "__main__":
    main()
