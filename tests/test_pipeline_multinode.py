"""DP x PP on several Ray nodes (ray.cluster_utils.Cluster, all on this machine): the replicas of
a pipeline spread over the nodes. One short run (1 epoch, 2 replicas x 2 stages) in a process of
its own with a private RAY_TMPDIR (a process joins one Ray only); the nodes each actor ran on
come from the run's recorded step."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from raydist.strategies.pipeline import events

REPO = Path(__file__).resolve().parents[1]

# Two worker nodes with room for all four actors each, 4 of 16 CPUs: Ray's default (hybrid)
# policy packs a node up to half its CPUs, so it would place all four on one. The head
# has no CPUs, so no actor lands there.
SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from raydist.config import RunSpec
    from raydist.train import train

    out = sys.argv[1]
    store = 80 * 2**20
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": store})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=16, object_store_memory=store)
        cluster.wait_for_nodes()
        spec = RunSpec.from_dict({"strategy": "pipeline", "model": "mlp", "hidden": [16], "epochs": 1,
                                  "batch_size": 64, "stages": 2, "replicas": 2, "microbatches": 2,
                                  "address": cluster.address, "out": out})
        train(spec, lambda rec: None)
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


@pytest.mark.multinode
def test_replicas_spread_over_the_nodes(tmp_path):
    out = tmp_path / "run"
    # short: Ray's socket paths under RAY_TMPDIR must fit in 107 bytes
    with tempfile.TemporaryDirectory(prefix="rdpp-", dir="/tmp") as ray_tmp:
        env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    actors = json.loads((out / events.EVENTS).read_text())["actors"]
    assert len(actors) == 4
    per_node = collections.Counter(a["node"] for a in actors)
    assert sorted(per_node.values()) == [2, 2]
