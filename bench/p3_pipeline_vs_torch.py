"""P3: raydist pipeline (2 stage actors x 1 thread, M = 8) against torch.distributed.pipelining
(2 ranks under torchrun, gloo) with the same cut, for GPipe, 1F1B and interleaved 1F1B (V = 2:
2 chunks per rank, torch's ScheduleInterleaved1F1B): steady-state throughput. Then DP x PP:
raydist with 2 replicas x 2 stages (4 actors) against 1 replica, with no torch peer; `--nodes N`
runs that pair on a ray.cluster_utils.Cluster of N worker nodes (2 CPUs each) on this machine.

    .venv/bin/python bench/p3_pipeline_vs_torch.py --reps 5
    .venv/bin/python bench/p3_pipeline_vs_torch.py --reps 5 --only-replicas --nodes 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import common
import ray

from raydist.config import RunSpec

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")


@contextmanager
def ray_on(nodes: int) -> Iterator[str | None]:
    """The embedded Ray (nodes = 0), or a Cluster of `nodes` workers of 2 CPUs (its address)."""
    if not nodes:
        common.start_ray()
        try:
            yield None
        finally:
            ray.shutdown()
        return
    from ray.cluster_utils import Cluster

    # a head of its own writes ray_current_cluster into RAY_TMPDIR: a private one, never another's
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="raydist_p3_")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()


def versus_torch(args: argparse.Namespace) -> None:
    specs = {s: common.spec(strategy="pipeline", stages=2, microbatches=args.microbatches, schedule=s)
             for s in SCHEDULES}
    variants = {}
    for s, spec in specs.items():
        variants[f"raydist {s}"] = lambda spec=spec: common.steady(common.raydist_records(spec))
        variants[f"torch {s}"] = lambda spec=spec, s=s: common.torchrun(
            "torch_pipeline.py", 2, [*common.peer_args(spec), "--schedule", s])["epoch_times"][1:]
    with ray_on(0):
        times = common.alternate(variants, args.reps)
    n = common.samples(specs["gpipe"])
    rows = []
    for s in SCHEDULES:
        ours, peer = common.median(times[f"raydist {s}"]), common.median(times[f"torch {s}"])
        rows.append([s, n / ours, n / peer, peer / ours])
    print(f"\nP3 on {common.machine()}; {specs['gpipe'].model} {specs['gpipe'].hidden}, batch "
          f"{specs['gpipe'].batch_size}, 2 stages, M = {args.microbatches}; medians of "
          f"{len(times['raydist gpipe'])} epochs")
    print(common.markdown(["schedule", "raydist samples/s", "torch.distributed.pipelining samples/s",
                           "throughput ratio raydist / torch"], rows))


def replicas(args: argparse.Namespace) -> None:
    with ray_on(args.nodes) as address:
        specs: dict[int, RunSpec] = {
            r: common.spec(strategy="pipeline", stages=2, microbatches=args.microbatches, schedule="1f1b",
                           replicas=r, address=address) for r in (1, 2)}
        times = common.alternate({r: (lambda r=r: common.steady(common.raydist_records(specs[r])))
                                  for r in specs}, args.reps)
    n = common.samples(specs[1])
    one = common.median(times[1])
    where = f"a Cluster of {args.nodes} worker nodes x 2 CPUs" if args.nodes else "the embedded Ray"
    print(f"\nP3 DP x PP on {common.machine()}, {where}; 1F1B, 2 stages, M = {args.microbatches} per "
          f"replica's share; medians of {len(times[1])} epochs")
    print(common.markdown(["replicas", "actors", "samples/s", "speedup over 1 replica"],
                          [[r, 2 * r, n / common.median(times[r]), one / common.median(times[r])]
                           for r in specs]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--nodes", type=int, default=0, help="DP x PP on a Cluster of this many worker nodes")
    p.add_argument("--only-replicas", action="store_true", help="skip the torch comparison")
    args = p.parse_args()
    if not args.only_replicas:
        versus_torch(args)
    replicas(args)


if __name__ == "__main__":
    main()
