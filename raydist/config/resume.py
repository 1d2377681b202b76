"""Which knobs a resumed run may change: those whose `resumable` metadata allows it for the
strategy (where and how fast a run goes, never what it computes), less those the spec's own
settings make part of what it computes (PINNED)."""

from __future__ import annotations

from typing import Any

from raydist.config.knobs import registry_of
from raydist.config.run import KNOBS, RunSpec, reads


def resumable(strategy: str, spec: RunSpec | None = None) -> list[str]:
    """The knobs a resumed run of `strategy` may change, in RunSpec's order; with `spec`, not
    those its own settings make part of what it computes (`pinned`)."""
    out = []
    fixed = pinned(spec) if spec is not None else {}
    for name, f in KNOBS.items():
        rule = f.metadata["resumable"]
        if reads(strategy, name) and (rule is True or (rule and strategy in rule)) and name not in fixed:
            out.append(name)
    return out


def pinned(spec: RunSpec) -> dict[str, str]:
    """Knobs resumable by their metadata that `spec` makes part of what it computes: name -> why."""
    return {name: why(spec) for name, test, why in PINNED if test(spec)}


def _spans_run(spec: RunSpec) -> bool:
    return registry_of("lr_schedule")[spec.lr_schedule].spans_run


# (knob, when a resumed run may not change it, why)
PINNED: tuple[tuple[str, Any, Any], ...] = (
    ("workers", lambda s: s.batch_per_worker is not None,
     lambda s: f"the global batch is batch_per_worker ({s.batch_per_worker}) x workers"),
    ("epochs", _spans_run,
     lambda s: f"lr_schedule {s.lr_schedule} spans the run's optimizer steps, which epochs sets"),
)
