"""One embedded Ray for the whole session: private (address="local"), small, quiet."""

from __future__ import annotations

import json
import os
from typing import Any

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


class Trained:
    """Runs one module trained, for a later module that needs the very same run (an undisturbed
    reference): a Ray Train fit costs ~35 CPU-seconds on this machine, mostly its processes'
    imports. Keyed by the spec without `out` and `max_failures`, neither of which changes what
    a run computes. A module run alone finds nothing here and trains its own."""

    def __init__(self) -> None:
        self.runs: dict[str, Any] = {}

    @staticmethod
    def key(spec: Any) -> str:
        fields = {k: v for k, v in spec.to_dict().items() if k not in ("out", "max_failures")}
        return json.dumps(fields, sort_keys=True)

    def put(self, spec: Any, result: Any) -> None:
        self.runs[self.key(spec)] = result

    def get(self, spec: Any) -> Any:
        return self.runs.get(self.key(spec))


@pytest.fixture(scope="session")
def trained() -> Trained:
    return Trained()
