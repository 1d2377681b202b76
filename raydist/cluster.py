"""Where a run executes: an embedded local Ray by default, or the cluster named by
`spec.address` / RAY_ADDRESS; and the check that a run can ever fit there."""

from __future__ import annotations

import logging
import os

import ray

from raydist.config import ConfigError, RunSpec

# Ray Train's controller polls its workers every 2 s by default; 0.2 s cuts ~6 s off each fit().
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def connect(spec: RunSpec) -> None:
    """Join the Ray the caller already started, the named cluster, or start an embedded one.
    `address="local"` never joins somebody else's cluster by accident."""
    if ray.is_initialized():
        return
    address = spec.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
                 configure_logging=True)


def capacity() -> dict[str, float]:
    """The most CPUs and GPUs the cluster can ever offer."""
    total = ray.cluster_resources()
    return {"CPU": total.get("CPU", 0.0), "GPU": total.get("GPU", 0.0)}


def require(cpus: float, gpus: float, what: str) -> None:
    """Fail at once if `what` needs more than the cluster can ever give (Ray would wait forever)."""
    cap = capacity()
    for kind, need in (("CPU", cpus), ("GPU", gpus)):
        if need > cap[kind]:
            raise ConfigError(f"{what} needs {need:g} {kind}s but the cluster can provide at "
                              f"most {cap[kind]:g}")
