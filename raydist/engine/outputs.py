"""What every run leaves in its output folder: spec.yaml (written when the run starts),
metrics.csv, memory.csv, model.pt and machine.yaml (when it ends): the same files for every strategy. Each is
written beside its name and renamed over it (checkpoint.replacing): a kill mid-write leaves the
file of the run before whole, and a resume can still read it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pandas as pd
import torch
import yaml

from raydist.config import RunSpec
from raydist.engine.checkpoint import replacing, save
from raydist.engine.loop import RunResult
from raydist.engine.preflight import SPEC_FILE
from raydist.engine.record import Record, scalars, worker_rows

MEMORY_FILE = "memory.csv"


def claim(spec: RunSpec) -> Path:
    """Create the output folder and write the spec into it: a later run with the same out is
    checked against it (preflight.check_resumable)."""
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    with replacing(out / SPEC_FILE) as tmp:
        spec.save(tmp)
    return out


def save_metrics(out: Path, records: list[Record]) -> None:
    """metrics.csv, one row per epoch; memory.csv beside it, one row per epoch per worker,
    when the records carry the workers' own memory (engine/record.py, per_worker_memory)."""
    with replacing(out / "metrics.csv") as tmp:
        pd.DataFrame([scalars(r) for r in records]).to_csv(tmp, index=False)
    rows = worker_rows(records)
    if rows:
        with replacing(out / MEMORY_FILE) as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)


def save_outputs(out: Path, spec: RunSpec, result: RunResult) -> None:
    """The files of a finished run, in the folder `claim` made (spec.yaml is there already)."""
    save_metrics(out, result.metrics)
    save(out / "model.pt", {k: v.detach().cpu() for k, v in result.state_dict.items()})
    with replacing(out / "machine.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(machine_info(spec), sort_keys=False))


def machine_info(spec: RunSpec) -> Record:
    import ray

    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if "model name" in line),
               platform.processor())
    return {"host": platform.node(), "cpu_model": cpu, "cpus": os.cpu_count(),
            "gpus": torch.cuda.device_count(), "threads_per_worker": spec.threads_per_worker,
            "python": platform.python_version(), "torch": str(torch.__version__),
            "ray": ray.__version__}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
