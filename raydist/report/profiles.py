"""Optimizers compared over workloads as AlgoPerf does (Dahl et al., 2023), from a sweep's trials:

- a workload is a (model, data) pair; every optimizer searches the same space (an lr grid);
- an optimizer's time on a workload is the median time to target over seeds at its best lr
  (the lr with the smallest median; a seed that never reaches the target counts as infinite,
  and lrs that all never reach it are told apart by their median final metric);
- its performance ratio on a workload is that time over the best optimizer's time there
  (infinite when it never reaches the target, or when no optimizer does);
- its performance profile rho(tau) is the share of workloads whose ratio is <= tau, tau >= 1:
  rho(1) is the share it wins, the limit is the share it ever solves.

`raydist report` adds this section when the sweep covers more than one workload.
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import matplotlib.ticker
import pandas as pd

from raydist import figures
from raydist.config import RunSpec
from raydist.report.tables import fmt, fmt_time, markdown

WORKLOAD = ("model", "data")
TAUS = (1.0, 1.5, 2.0, 4.0)
"""The taus the report's table shows; the plot draws the whole step function."""


def workload_of(trials: pd.DataFrame) -> pd.Series:
    return trials[list(WORKLOAD)].astype(str).agg("/".join, axis=1)


def final_loss(results: pd.DataFrame) -> pd.Series:
    """Each trial's val_loss at its last epoch (nan if it ran none), indexed by trial_id."""
    runs = results.dropna(subset=["epoch"]).sort_values("epoch")
    return runs.groupby("trial_id")["val_loss"].last()


def per_lr(trials: pd.DataFrame, mode: str) -> pd.DataFrame:
    """Medians over seeds per workload, optimizer and lr (and any other field the sweep varies
    beside them, as part of the optimizer's setting): time to target, final metric, final loss."""
    spec = [f.name for f in fields(RunSpec)]
    others = [c for c in spec if c in trials and c not in (*WORKLOAD, "optimizer", "lr", "seed", "out")
              and trials[c].astype(str).nunique() > 1]
    worst = -math.inf if mode == "max" else math.inf
    table = trials.assign(workload=workload_of(trials), ranked=trials["final"].fillna(worst))
    grouped = table.groupby(["workload", "optimizer", "lr", *others], sort=True, dropna=False)
    return pd.DataFrame({
        "seeds": grouped.size(),
        "time_to_target": grouped["time_to_target"].median(),
        "final": grouped["ranked"].median(),
        "final_loss": grouped["final_loss"].median(),
    }).reset_index()


def best(table: pd.DataFrame, mode: str) -> pd.DataFrame:
    """Per workload and optimizer, the row of its best lr: the smallest median time to target,
    then the best median final metric."""
    ranked = table.sort_values(["time_to_target", "final"], ascending=[True, mode == "min"],
                               kind="stable")
    return ranked.groupby(["workload", "optimizer"], sort=True).head(1).reset_index(drop=True)


def ratios(scores: pd.DataFrame) -> pd.DataFrame:
    """Workload x optimizer: time over the workload's best time (inf: not reached, by it or by all)."""
    times = scores.pivot(index="workload", columns="optimizer", values="time_to_target")
    fastest = times.min(axis=1)
    out = times.copy()
    for w in times.index:
        t_best = fastest[w]
        out.loc[w] = [t / t_best if math.isfinite(t) and math.isfinite(t_best) else math.inf
                      for t in times.loc[w]]
    return out


def profile(ratio: pd.DataFrame, taus: list[float] | tuple[float, ...]) -> pd.DataFrame:
    """rho(tau) per optimizer: the share of workloads whose ratio is <= tau."""
    return pd.DataFrame({o: [float((ratio[o] <= tau).mean()) for tau in taus] for o in ratio.columns},
                        index=pd.Index(list(taus), name="tau"))


# --- plots ------------------------------------------------------------------------------------------

def plot_profile(ratio: pd.DataFrame, path: Path) -> None:
    finite = [r for r in ratio.to_numpy().ravel() if math.isfinite(r)]
    tau_max = max(2.0, 1.1 * max(finite, default=1.0))
    fig, ax = figures.subplots(figsize=(7, 4.5))
    for name in ratio.columns:
        steps = sorted(r for r in ratio[name] if math.isfinite(r))
        taus = [1.0, *steps, tau_max]
        shares = [float((ratio[name] <= t).mean()) for t in taus]
        ax.step(taus, shares, where="post", label=name)
    ax.set_xlim(1.0, tau_max)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("tau: time to target within tau x the best optimizer's")
    ax.set_ylabel("share of workloads")
    ax.set_title(f"performance profiles over {len(ratio)} workloads (median over seeds, best lr)")
    ax.grid(alpha=0.3)
    ax.legend()
    figures.save(fig, path)


def plot_sensitivity(table: pd.DataFrame, path: Path) -> None:
    """One column per optimizer: median time to target (top) and final loss (bottom) against
    lr, one line per workload; an lr that never reaches the target leaves a gap on top."""
    names = sorted(table["optimizer"].unique())
    fig, axes = figures.subplots(2, len(names), figsize=(3.6 * len(names), 6.5), squeeze=False,
                             sharex=True)  # every optimizer searched the same lrs
    for col, name in enumerate(names):
        top, bottom = axes[0][col], axes[1][col]
        for workload, rows in table[table["optimizer"] == name].groupby("workload", sort=True):
            rows = rows.groupby("lr")[["time_to_target", "final_loss"]].min().sort_index()
            reached = rows["time_to_target"].where(rows["time_to_target"].map(math.isfinite))
            top.plot(rows.index, reached, "o-", label=workload)
            bottom.plot(rows.index, rows["final_loss"], "o-", label=workload)
        top.set_title(name)
        for ax, what in ((top, "time to target (s)"), (bottom, "final val_loss")):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("learning rate")
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
        top.legend(fontsize=8)
    fig.suptitle("lr sensitivity per optimizer: median over seeds")
    figures.save(fig, path)




# --- the report's section ---------------------------------------------------------------------------

def section(results: pd.DataFrame, trials: pd.DataFrame, mode: str, target: float | None,
            root: Path) -> list[str]:
    """report.md's lines for a sweep over several workloads; none for one workload."""
    if not set(WORKLOAD) <= set(trials) or "optimizer" not in trials or "lr" not in trials:
        return []
    if workload_of(trials).nunique() < 2:
        return []
    head = ["## Performance profiles (AlgoPerf)", ""]
    if target is None:
        return [*head, "Time to target needs sweep.target: no profile.", ""]
    trials = trials.assign(final_loss=trials["trial_id"].map(final_loss(results)))
    table = per_lr(trials, mode)
    scores = best(table, mode)
    ratio = ratios(scores)
    plot_profile(ratio, root / "profiles.png")
    plot_sensitivity(table, root / "lr_profiles.png")
    shares = profile(ratio, TAUS)
    shares.index = [f"rho({tau:g})" for tau in shares.index]
    return [*head, "Per optimizer and workload, the best lr by median time to target over seeds "
            "(a seed that never reaches the target counts as infinite); ratio = time / the "
            "workload's best time; rho(tau) = share of workloads with ratio <= tau. See "
            "raydist/report/profiles.py.", "", markdown(result_table(scores, ratio)), "",
            markdown(shares.T.rename_axis("optimizer").reset_index()), "",
            "![performance profiles](profiles.png)", "", "![lr sensitivity per optimizer](lr_profiles.png)",
            ""]


def result_table(scores: pd.DataFrame, ratio: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "optimizer": scores["optimizer"], "workload": scores["workload"],
        "best lr": scores["lr"].map(lambda v: f"{v:g}"), "seeds": scores["seeds"],
        "time to target (median)": scores["time_to_target"].map(fmt_time),
        "ratio": [fmt(ratio.loc[w, o], "{:.2f}") for w, o in zip(scores["workload"], scores["optimizer"],
                                                                  strict=True)],
        "final val_loss (median)": scores["final_loss"].map(lambda v: fmt(v, "{:.4f}")),
    }).sort_values(["optimizer", "workload"]).reset_index(drop=True)
