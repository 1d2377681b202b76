"""One embedded Ray for the whole session: private (address="local"), small, quiet. And the
test tiers: every test carries exactly one of the marks in TIERS (pyproject.toml describes them),
and a `unit` test that tries to start Ray fails."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# A local Ray the developer keeps with `raydist ray start` (raydist.runtime.connect.LOCAL_RAY names where
# it is written down) must not catch the suite's runs, in this process or in the CLI processes
# the tests start: the suite's file names no head (tests/test_local_ray.py sets its own).
os.environ["RAYDIST_LOCAL_RAY"] = str(Path(__file__).resolve().parent / ".no-local-ray.yaml")

# The example user project (examples/resmlp) is on PYTHONPATH as its README says: for this
# process, and for every Ray worker, which inherits the environment of the Ray it belongs to.
EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "resmlp")
os.environ["PYTHONPATH"] = os.pathsep.join([EXAMPLE, *filter(None, [os.environ.get("PYTHONPATH")])])
sys.path.insert(0, EXAMPLE)

# Logical CPUs: enough for a 2-worker run beside a parameter server and Tune trial drivers;
# the machine has 2 cores, the tests keep the work small.
RAY_CPUS = 4

TIERS = ("unit", "ray", "multinode")


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything: every collected test is checked
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse to run when a test has no tier, or more than one, so a new test cannot slip in
    untiered (out of `pytest -m unit` and out of the slower tiers alike); or when a unit test
    uses ray_local, or a ray test does not."""
    wrong = []
    for item in items:
        tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if len(tiers) != 1:
            marked = f"marked {' and '.join(tiers)}" if tiers else "no tier mark"
            wrong.append(f"  {item.nodeid}: {marked}")
        elif tiers == ["unit"] and "ray_local" in getattr(item, "fixturenames", ()):
            wrong.append(f"  {item.nodeid}: marked unit, but it uses the ray_local fixture")
        elif tiers == ["ray"] and "ray_local" not in getattr(item, "fixturenames", ()):
            # Else its train or sweep would start this process's Ray itself, with other
            # resources than ray_local's, and whichever module came next would find that one.
            wrong.append(f"  {item.nodeid}: marked ray, but it does not use the ray_local fixture")
    if wrong:
        raise pytest.UsageError(
            f"each test needs exactly one tier mark, one of {', '.join(TIERS)} (a whole file: "
            "`pytestmark = pytest.mark.unit`; one test: `@pytest.mark.ray`); a unit test never uses "
            "the ray_local fixture, a ray test always does (tests/conftest.py):\n" + "\n".join(wrong))
    order_modules(items)


# `make test` runs the suite on two pytest-xdist workers (--dist loadfile), each with its own
# session Ray: a Ray test spends much of its time waiting (on Ray's start-up, a death being
# noticed, a stall timing out), which the other worker's test fills. A module goes to one worker
# whole, so its module fixtures run once (a module that would reuse another's run through
# `trained` trains its own if that one ran on the other worker). The slowest modules are handed
# out first, so that none of them is left to run alone at the end; the quick ones fill the gaps.
SLOWEST_FIRST = ("test_real_cpus", "test_interrupts", "test_ps", "test_pipeline", "test_ddp",
                 "test_kills", "test_fsdp", "test_multinode", "test_tp", "test_sweep",
                 "test_levers_ray", "test_pipeline_dppp", "test_lr_schedule_ray", "test_stall",
                 "test_own_model")


def order_modules(items: list[pytest.Item]) -> None:
    """SLOWEST_FIRST's modules first, in that order; the rest after, as collected."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).stem, len(rank)))  # stable


def _refuse_ray(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("unit tests start no Ray")


@pytest.fixture(autouse=True)
def _unit_starts_no_ray(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a `unit` test, ray.init (which every way of starting or joining Ray goes through, Ray's
    own auto-init included) and raydist.runtime.connect.start_local raise. `import ray` is cheap (0.3 s
    once per process, measured; it imports no torch), so ray is imported here if no test module
    has done it yet: a test that imports it later still finds ray.init patched. raydist.runtime.connect
    is patched only if imported, its ray.init call is caught anyway."""
    if request.node.get_closest_marker("unit") is None:
        return
    import ray

    monkeypatch.setattr(ray, "init", _refuse_ray)
    cluster = sys.modules.get("raydist.runtime.connect")
    if cluster is not None and hasattr(cluster, "start_local"):
        monkeypatch.setattr(cluster, "start_local", _refuse_ray)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from raydist.runtime import connect

    # as the CLI starts it: with the dashboard, so that Ray Train can free a dead run's workers
    connect.start_local(num_cpus=RAY_CPUS, object_store_memory=100 * 2**20,
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
