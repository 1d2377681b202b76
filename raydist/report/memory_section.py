"""The report's memory section: what a worker must hold against how fast the run goes, for every
strategy in a sweep (issue 17). From results.csv: a trial's memory is the most over its epochs
of each record field (model_state_bytes, peak_rss_bytes, peak_gpu_bytes: each already the
maximum over the trial's workers, engine/record.py), its throughput the report's (median
samples/s after the first epoch). A sweep none of whose trials recorded memory has no section."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from raydist import figures
from raydist.memory import gib
from raydist.report.facts import count_of
from raydist.report.tables import fmt, markdown

FIELDS = {"model_state_bytes": "model state per worker", "peak_rss_bytes": "peak RSS per worker",
          "peak_gpu_bytes": "peak GPU memory per worker"}
"""The record's memory fields the section shows, where the sweep's trials have them."""


def per_trial(results: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """Each trial's strategy, workers, throughput and the most of each memory field it recorded."""
    fields = [f for f in FIELDS if f in results and results[f].notna().any()]
    most = results.groupby("trial_id")[fields].max()
    keep = [c for c in ("trial_id", "strategy", "workers", "stages", "samples_per_s") if c in trials]
    table = trials[keep].set_index("trial_id").join(most, how="inner")
    return table.dropna(subset=fields[:1]).reset_index()


def plot(table: pd.DataFrame, fields: list[str], path: Path) -> None:
    fig, axes = figures.subplots(1, len(fields), figsize=(6 * len(fields), 4.5), squeeze=False)
    label = table["strategy"] if "strategy" in table else pd.Series("run", index=table.index)
    for ax, field in zip(axes[0], fields, strict=True):
        for name, rows in table.groupby(label, sort=True):
            ax.scatter(rows[field] / 2**20, rows["samples_per_s"], label=name)
            for _, r in rows.iterrows():
                ax.annotate(workers_of(r), (r[field] / 2**20, r["samples_per_s"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.set(xscale="log", xlabel=f"{FIELDS[field]} (MiB)", ylabel="samples/s")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("memory a worker holds vs throughput (labels: N workers or stages)")
    figures.save(fig, path)


def workers_of(row: pd.Series) -> str:
    """'N=4', N the knob that counts the strategy's workers (its COUNT: a pipeline's stages),
    '' when the trial has no count."""
    key = count_of(row.get("strategy"))
    return f"N={row[key]:g}" if key in row and pd.notna(row[key]) else ""


def section(results: pd.DataFrame, trials: pd.DataFrame, root: Path) -> list[str]:
    """The report's lines (and memory.png), or none when no trial recorded memory."""
    if "model_state_bytes" not in results or results["model_state_bytes"].isna().all():
        return []
    table = per_trial(results, trials)
    fields = [f for f in FIELDS if f in table]
    plot(table, fields, root / "memory.png")
    shown = table.assign(samples_per_s=table["samples_per_s"].map(lambda v: fmt(v, "{:.0f}")),
                         **{f: table[f].map(lambda v: gib(v) if pd.notna(v) else "-") for f in fields})
    return ["## Memory per worker", "",
            "Each trial's worst worker (ddp rank, ps replica or server, pipeline stage): model state "
            "counted from its tensors' storages, the peak resident memory of its process (the "
            "runtime and the data included), the most over the trial's epochs; throughput as above.",
            "", markdown(shown), "", "![memory](memory.png)", ""]
