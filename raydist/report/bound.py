"""The report's account of what this machine allows and where scaling pays: the compute-only
bound (raydist/plan/machine_bound.py, DIR/bound.csv) beside every measured speedup, and `raydist plan`'s
prediction for a cluster (DIR/plan/plan.csv, written by a sweep with `plan:`).

- efficiency_vs_bound = samples/s(N) / bound samples/s(N) of the same setting: the share of
  what N bare workers reach here, nothing exchanged, that the strategy reaches; the rest is its
  communication (and its own overhead);
- bound_speedup = bound(N) / bound(1): the most data parallelism can give on this machine,
  drawn as a line beside the measured speedups (and bound_speedup / N beside the efficiencies).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from raydist.plan import machine_bound as bound
from raydist.report.facts import count_of, data_parallel
from raydist.report.tables import fmt, markdown

PLAN_CSV = Path("plan") / "plan.csv"


def add(table: pd.DataFrame, keys: list[str], scale: str, root: Path,
        strategy: str | None = None) -> pd.DataFrame:
    """The speedup table with bound_samples_per_s, bound_speedup and efficiency_vs_bound (nan
    where the sweep measured no bound for the row's setting and N, or the row's strategy is not
    data parallel). `strategy`: the sweep's one strategy, where the table has no such column."""
    measured = bound.load(root)
    if measured is None or scale != "workers":
        return table
    on = [k for k in keys if k in measured.columns]
    at = {(*(str(r[k]) for k in on), int(r["workers"])): float(r["samples_per_s"])
          for _, r in measured.iterrows()}

    def lookup(row: pd.Series, n: int) -> float:
        if not data_parallel(row["strategy"] if "strategy" in row else strategy):
            return math.nan
        return at.get((*(str(row[k]) for k in on), n), math.nan)

    out = table.copy()
    out["bound_samples_per_s"] = [lookup(r, int(r[scale])) for _, r in table.iterrows()]
    out["bound_speedup"] = out["bound_samples_per_s"] / [lookup(r, 1) for _, r in table.iterrows()]
    out["efficiency_vs_bound"] = out["samples_per_s"] / out["bound_samples_per_s"]
    return out


def columns(table: pd.DataFrame) -> list[str]:
    return ["bound_samples_per_s", "efficiency_vs_bound"] if "efficiency_vs_bound" in table else []


def shown(table: pd.DataFrame) -> dict[str, Any]:
    """The bound's columns as the table prints them."""
    if "efficiency_vs_bound" not in table:
        return {}
    return {"bound_samples_per_s": table["bound_samples_per_s"].map(lambda v: fmt(v, "{:.0f}")),
            "efficiency_vs_bound": table["efficiency_vs_bound"].map(lambda v: fmt(v, "{:.2f}"))}


LEGEND = (" bound_samples_per_s = N bare Ray actors on this machine, each training the same "
          "model, optimizer and threads on its 1/N of every batch, nothing exchanged (the most "
          "data parallelism can give here; raydist/plan/machine_bound.py); efficiency_vs_bound = samples/s / "
          "bound_samples_per_s: what communication and overhead leave of it (dotted line in the plot).")


def draw(axes: Any, table: pd.DataFrame, scale: str) -> None:
    """The bound's speedup and efficiency (median over settings) as dotted lines."""
    if "bound_speedup" not in table or table["bound_speedup"].isna().all():
        return
    curve = table.dropna(subset=["bound_speedup"]).groupby(scale)["bound_speedup"].median()
    axes[0].plot(curve.index, curve.values, "s:", color="grey", label="this machine's bound")
    axes[1].plot(curve.index, curve.values / curve.index, "s:", color="grey",
                 label="this machine's bound")


def section(table: pd.DataFrame, scale: str, root: Path, cluster: dict | None) -> list[str]:
    """One paragraph per scaled strategy at its largest N: the share of the bound it reaches,
    and the plan's prediction on a cluster."""
    lines: list[str] = []
    if "efficiency_vs_bound" in table and "strategy" in table:
        for _, r in table[table[scale] > 1].dropna(subset=["efficiency_vs_bound"]).iterrows():
            of_one = f" {r['speedup']:.2f}x of 1 worker, and" if math.isfinite(r["speedup"]) else ""
            lines.append(f"- {r['strategy']} on {int(r[scale])} workers:{of_one} "
                         f"{r['efficiency_vs_bound']:.2f} of what {int(r[scale])} workers "
                         f"reach on this machine with nothing exchanged (bound "
                         f"{r['bound_speedup']:.2f}x); communication and overhead cost the rest.")
    lines += cluster_lines(root, cluster or {})
    return ["## What this machine allows, and a cluster", "", *lines, ""] if lines else []


def cluster_lines(root: Path, cluster: dict) -> list[str]:
    """The plan's strategy that it predicts fastest at its most workers, at every N."""
    if not (root / PLAN_CSV).is_file():
        return []
    plan = pd.read_csv(root / PLAN_CSV).dropna(subset=["step_s"])
    if plan.empty:
        return []
    at_most = plan[plan["workers"] == plan["workers"].max()]
    name = at_most.sort_values("step_s", kind="stable").iloc[0]["strategy"]
    rows = plan[plan["strategy"] == name].sort_values("workers")
    most = rows.iloc[-1]
    table = rows.assign(step_ms=rows["step_s"] * 1e3)[["workers", "step_ms", "speedup", "efficiency"]]
    links = f"{cluster.get('bandwidth', '?')} links, {cluster.get('latency', '?')} latency"
    return ["", f"`raydist plan` for the same model on a cluster (one worker per node, each computing "
            f"as one core of this machine, {links}): {name}, the fastest it predicts there, on "
            f"{int(most['workers'])} {count_of(name)} "
            f"would run {most['speedup']:.2f}x one (efficiency {most['efficiency']:.2f}). "
            "DIR/plan/ has every strategy.", "", markdown(table.round(3))]
