"""Soak: kills from outside for `--minutes`. Round after round, each strategy (ddp 2 workers,
ps sync, ps async, pipeline 2 stages) trains a small mlp on digits while a background thread
SIGKILLs randomly chosen processes of its actors at random moments (tests/killer.py: seeded,
Ray's State API, only this run's actors under this process). Each sync run is compared with an
uninterrupted run of the same spec (torch.equal on every tensor), trained once at the start.

    .venv/bin/python bench/soak_kills.py --minutes 5 [--kills 2] [--seed 0]

Prints a table per strategy: runs started, completed, equal to uninterrupted (sync), kills
sent, and anything lost (a run that failed, or epochs missing from its metrics.csv)."""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from killer import Killer  # noqa: E402

from raydist.config import RunSpec  # noqa: E402
from raydist.runtime import connect  # noqa: E402
from raydist.train import train  # noqa: E402

BASE = {"model": "mlp", "data": "digits", "hidden": [16], "epochs": 6, "seed": 0, "val_fraction": 0.1,
        "optimizer": "adam"}
RUNS: dict[str, tuple[dict[str, Any], int]] = {  # as tests/test_kills.py
    "ddp": ({"strategy": "ddp", "workers": 2, "batch_size": 8}, 2),
    "ps-sync": ({"strategy": "ps", "workers": 2, "servers": 1, "batch_size": 16}, 3),
    "ps-async": ({"strategy": "ps", "workers": 2, "servers": 1, "batch_size": 16, "mode": "async"}, 3),
    "pipeline": ({"strategy": "pipeline", "stages": 2, "batch_size": 32, "microbatches": 4}, 2),
}


def spec(name: str, out: Path, **changes: Any) -> RunSpec:
    return RunSpec.from_dict({**BASE, **RUNS[name][0], "out": str(out), **changes})


def quietly(s: RunSpec) -> Any:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return train(s, lambda rec: None)


def one(name: str, tmp: Path, i: int, kills: int, seed: int, clean: dict[str, torch.Tensor] | None,
        row: dict[str, Any]) -> None:
    out = tmp / f"{name}-{i}"
    s = spec(name, out, max_failures=kills + 1)
    row["started"] += 1
    try:
        with Killer(s.strategy, RUNS[name][1], kills=kills, seed=seed) as killer:
            quietly(s)
    except Exception as e:  # noqa: BLE001 - counted, and the soak goes on
        row["failed"] += 1
        row["notes"].add(f"{type(e).__name__}: {str(e)[:80]}")
        row["kills"] += len(killer.killed)
        return
    row["kills"] += len(killer.killed)
    row["completed"] += 1
    epochs = pd.read_csv(out / "metrics.csv")
    if epochs["epoch"].tolist() != list(range(1, BASE["epochs"] + 1)):
        row["lost"] += 1
    if clean is None:
        row["finite"] += all(math.isfinite(x) for x in epochs["train_loss"])
        return
    model = torch.load(out / "model.pt")
    row["equal"] += list(model) == list(clean) and all(torch.equal(model[k], clean[k]) for k in clean)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--kills", type=int, default=2, help="kills per run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    connect.start_local(num_cpus=4, object_store_memory=100 * 2**20)
    tmp = Path(tempfile.mkdtemp(prefix="soak_kills_"))
    t0 = time.monotonic()
    clean = {n: quietly(spec(n, tmp / f"clean-{n}")).state_dict for n in RUNS if n != "ps-async"}
    print(f"uninterrupted references: {time.monotonic() - t0:.0f} s", flush=True)
    rows = {n: {"started": 0, "completed": 0, "equal": 0, "finite": 0, "kills": 0, "failed": 0,
                "lost": 0, "notes": set()} for n in RUNS}
    deadline, i = time.monotonic() + 60 * args.minutes, 0  # the references do not count
    while time.monotonic() < deadline:
        for name in RUNS:
            if time.monotonic() >= deadline:
                break
            one(name, tmp, i, args.kills, args.seed + i, clean.get(name), rows[name])
            r = rows[name]
            print(f"[{time.monotonic() - t0:5.0f} s] {name} run {i}: {r['kills']} kills so far, "
                  f"{r['completed']}/{r['started']} completed", flush=True)
        i += 1
    print(f"\n{args.minutes:g} minutes of kills ({time.monotonic() - t0:.0f} s in all), {args.kills} kills "
          f"per run, seed {args.seed}\n")
    print("| strategy | runs | completed | equal to uninterrupted | kills sent | failed | epochs lost |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        equal = f"{r['finite']} finite (async)" if name == "ps-async" else str(r["equal"])
        print(f"| {name} | {r['started']} | {r['completed']} | {equal} | {r['kills']} | {r['failed']} | "
              f"{r['lost']} |")
    for name, r in rows.items():
        for note in sorted(r["notes"]):
            print(f"{name}: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
