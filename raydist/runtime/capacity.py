"""What a cluster can ever give a run: its resources now, what its autoscaler may add (as Ray
records it, or as a cluster-launcher file says), and the check that a run fits before Ray waits
forever."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import jsonschema
import ray

from raydist.config import ConfigError, load_yaml
from raydist.runtime import ray_compat

# Cloud nodes take minutes to boot; Ray Train gives a worker group 60 s to start by default, and a
# ddp run that waits for the autoscaler would fail after a few of those.
NODE_START_S = 600


def capacity() -> dict[str, float]:
    """The most of each resource the cluster can ever offer: what it has now, or what its
    autoscaler can grow it to, whichever is more (nodes an autoscaler has not started yet count)."""
    now, most = ray.cluster_resources(), autoscaler_max() or {}
    keys = {"CPU", "GPU"} | set(now) | set(most)
    return {k: max(float(now.get(k, 0.0)), float(most.get(k, 0.0))) for k in keys}


def autoscaler_max() -> dict[str, float] | None:
    """The autoscaler's maximum as Ray records it in the GCS (Ray Train checks its worker groups
    against the same record); None when there is no autoscaler or it recorded nothing. KubeRay
    records it; Ray 2.60's own autoscaler (`ray up`, `ray start --autoscaling-config`) does not,
    so the head publishes its config with `publish_max` after `ray start`."""
    return ray_compat.autoscaler_max_resources()


def require(cpus: float, gpus: float, what: str) -> None:
    """Fail at once if `what` needs more than the cluster can ever give (Ray would wait forever).
    On an autoscaling cluster "ever" includes the nodes the autoscaler may still add, and a
    run that fits may wait for them: Ray Train then gives its worker group NODE_START_S."""
    cap, scaling = capacity(), autoscaler_max() is not None
    limit = "can scale to at most" if scaling else "can provide at most"
    for kind, need in (("CPU", cpus), ("GPU", gpus)):
        if need > cap[kind]:
            raise ConfigError(f"{what} needs {need:g} {kind}s but the cluster {limit} {cap[kind]:g}")
    if scaling:
        # Ray Train passes it on from this process to its controller (ENV_VARS_TO_PROPAGATE)
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(NODE_START_S))


def publish_max(config: dict[str, Any]) -> dict[str, float]:
    """Record the autoscaler's limits from its config (the dict the head's autoscaler reads:
    available_node_types, head_node_type, max_workers) in the GCS of the connected cluster, where
    `autoscaler_max` and Ray Train look for them. Returns the maximum recorded."""
    record = limits_record(config)
    ray_compat.report_cluster_config(record)
    return max_resources(config)


def limits_record(config: dict[str, Any]) -> Any:
    """The autoscaler config as Ray's ClusterConfig record: each node type with its count range,
    and the cap that the top-level max_workers puts on each resource (`max_resources`)."""
    record = ray_compat.cluster_config_record()
    for name, node_type in config["available_node_types"].items():
        head = name == config["head_node_type"]
        group = record.node_group_configs.add(
            name=name, min_count=1 if head else node_type.get("min_workers", 0),
            max_count=1 if head else node_type["max_workers"])
        # the record holds whole units only: a fractional resource counts what is surely there
        group.resources.update({k: int(v) for k, v in node_type["resources"].items() if v >= 1})
    record.max_resources.update({k: int(v) for k, v in max_resources(config).items() if v >= 1})
    return record


def load_cluster_config(path: str | Path) -> dict[str, Any]:
    """The file as `ray up` sees it: merged with Ray's provider defaults and checked by Ray's own
    schema validation (offline: no cloud SDK, no credentials). Errors are one-line ConfigErrors."""
    raw = load_yaml(path)
    try:
        config = ray_compat.prepare_and_validate(copy.deepcopy(raw))
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "top level"
        raise ConfigError(f"{path}: {where}: {e.message.splitlines()[0]}") from None
    except KeyError as e:
        raise ConfigError(f"{path}: missing key {e}") from None
    except (ValueError, NotImplementedError, RuntimeError) as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    for name, node_type in config["available_node_types"].items():
        # Ray accepts this and the autoscaler would then never reach min_workers.
        if node_type["min_workers"] > node_type["max_workers"]:
            raise ConfigError(f"{path}: available_node_types.{name}: min_workers "
                              f"{node_type['min_workers']} > max_workers {node_type['max_workers']}")
    return config


def max_resources(config: dict[str, Any]) -> dict[str, float]:
    """The most of each resource the autoscaler can ever bring up: the head node, plus up to
    the top-level `max_workers` worker nodes, each type at most its own `max_workers`.
    Each resource is maximised on its own (the types with the most of it fill the cap first),
    so the CPU and GPU maxima may need different worker mixes and need not hold at once."""
    types = config["available_node_types"]
    for name, node_type in types.items():
        missing = [k for k in ("CPU", "GPU") if k not in node_type.get("resources", {})]
        if missing:
            # Ray learns an instance type's CPUs/GPUs from the cloud API at launch only.
            raise ConfigError(f"available_node_types.{name}: resources has no "
                              f"{' or '.join(missing)}; give both, e.g. resources: {{CPU: 8, GPU: 0}}")
    head = types[config["head_node_type"]]["resources"]
    keys = ["CPU", "GPU"] + sorted({k for t in types.values() for k in t["resources"]} - {"CPU", "GPU"})
    return {k: head.get(k, 0.0) + most_from_workers(types, config["max_workers"], k) for k in keys}


def most_from_workers(types: dict[str, Any], slots: int, key: str) -> float:
    """Greedy fill of `slots` worker nodes with the types richest in `key`: optimal, since every
    node costs one slot whatever its type."""
    total = 0.0
    for node_type in sorted(types.values(), key=lambda t: -t["resources"].get(key, 0)):
        n = min(node_type["max_workers"], slots)
        total += n * node_type["resources"].get(key, 0)
        slots -= n
    return float(total)


def check_cluster_file(path: str | Path) -> dict[str, float]:
    """`raydist cluster check FILE`: validate it and return its autoscaling maximum."""
    config = load_cluster_config(path)
    try:
        return max_resources(config)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
