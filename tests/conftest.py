"""One embedded Ray for the whole session: private (address="local"), small, quiet."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

# Logical CPUs: enough for a 2-worker run beside a parameter server and Tune trial drivers;
# the machine has 2 cores, the tests keep the work small.
RAY_CPUS = 4


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from raydist import cluster

    # as the CLI starts it: with the dashboard, so that Ray Train can free a dead run's workers
    cluster.start_local(num_cpus=RAY_CPUS, object_store_memory=100 * 2**20,
                        resources={"trial_driver": 8})
    yield ray
    ray.shutdown()
