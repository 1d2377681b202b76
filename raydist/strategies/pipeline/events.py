"""The recorded step of a pipeline run: every stage actor's ops (forward, backward, weight pass,
receive, send, the flush, the replicas' all-reduce, the optimizer step), each with its start and
end, written to `out/stage_events.json` for `raydist report`'s timeline. No Ray, no torch.

The file: {"epoch", "step", "schedule", "stages", "replicas", "chunks", "microbatches",
"actors": [{"replica", "stage", "node", "events": [[kind, micro-batch, chunk, start_s, end_s], ...]}]},
times in seconds from the first event's start (wall clocks: the actors' nodes' clocks must
agree; one machine's do). Micro-batch and chunk are -1 for the per-step kinds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EVENTS = "stage_events.json"
COMPUTE = ("F", "B", "W")
"""The op kinds that compute on micro-batches: the schedule's ops."""
WAITS = ("recv", "send", "sends", "allreduce")
"""The kinds that wait for communication."""


def write(out: str | Path, head: dict[str, Any], actors: list[dict[str, Any]]) -> Path:
    """`head` (epoch, step, schedule, ...) and each actor's {"replica", "stage", "node", "events"}, its
    events' wall-clock times made relative to the earliest start."""
    t0 = min((e[3] for a in actors for e in a["events"]), default=0.0)
    shifted = [{**a, "events": [[k, mb, c, s - t0, e - t0] for k, mb, c, s, e in a["events"]]}
               for a in actors]
    path = Path(out) / EVENTS
    path.write_text(json.dumps({**head, "actors": shifted}))
    return path


def read(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def compute_ops(actor: dict[str, Any]) -> list[tuple[str, int, int]]:
    """An actor's schedule ops in the order they ran."""
    return [(k, mb, c) for k, mb, c, *_ in sorted(actor["events"], key=lambda e: e[3]) if k in COMPUTE]
