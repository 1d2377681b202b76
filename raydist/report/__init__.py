"""`raydist report DIR`: a sweep's results.csv turned into tables, Markdown and PNG plots (and
report.html, the same as one page: report_html.py).

Every number comes from results.csv (one row per trial per epoch), by these rules:
- a trial's throughput is the median samples/s over its epochs after the first (the first
  holds warm-up), or its only epoch;
- a setting is the trial's values of the spec fields the sweep varies, seed excluded; a setting's
  throughput, final metric and time to target are medians over its seeds;
- time to target is the wall time (from the start of training) at the first epoch whose metric
  reaches the target; a seed that never reaches it counts as infinitely slow;
- speedup(N) = throughput(N) / throughput(1) within a setting that differs only in N (the
  sweep's `scale` field, workers by default); efficiency = speedup(N) / N; time-to-target
  speedup = time(1) / time(N); vs_local = throughput(N) / throughput of `local` in the same setting;
- a trial scales strong (a fixed global batch: batch_size) or weak (batch_per_worker: the global
  batch grows with the replicas); its global batch is the records' global_batch.
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import pandas as pd
import yaml

from raydist import figures, tracking
from raydist.config import ConfigError, RunSpec, SweepSpec, load_sweep
from raydist.report import bound as report_bound
from raydist.report import html as report_html
from raydist.report import memory_section, profiles, timeline
from raydist.report.tables import fmt, fmt_time, fmt_value, markdown

SPEC = [f.name for f in fields(RunSpec)]
NOT_A_SETTING = ("seed", "out", "address")  # differ between trials without changing what is run


# --- one row per trial -------------------------------------------------------------------------

def per_trial(results: pd.DataFrame, metric: str, mode: str, target: float | None) -> pd.DataFrame:
    """Spec, status, epochs, throughput, final metric and time to target of each trial."""
    rows = []
    for trial_id, trial in results.groupby("trial_id", sort=True):
        runs = trial.dropna(subset=["epoch"]).sort_values("epoch")
        first = trial.iloc[0]
        rows.append({"trial_id": trial_id, "status": first["status"], **first[spec_columns(results)],
                     "scaling": "weak" if pd.notna(first.get("batch_per_worker")) else "strong",
                     "global_batch": runs["global_batch"].median() if "global_batch" in runs else math.nan,
                     "epochs_run": len(runs), "samples_per_s": throughput(runs),
                     "final": runs[metric].iloc[-1] if len(runs) else math.nan,
                     "time_to_target": time_to_target(runs, metric, mode, target)})
    return pd.DataFrame(rows)


def spec_columns(results: pd.DataFrame) -> list[str]:
    return [c for c in SPEC if c in results.columns]


def throughput(runs: pd.DataFrame) -> float:
    steady = runs[runs["epoch"] > 1] if len(runs) > 1 else runs
    return float(steady["samples_per_s"].median()) if len(steady) else math.nan


def time_to_target(runs: pd.DataFrame, metric: str, mode: str, target: float | None) -> float:
    """Wall time at the first epoch that reaches `target`; inf if none does, nan without target."""
    if target is None:
        return math.nan
    hit = runs[runs[metric] >= target] if mode == "max" else runs[runs[metric] <= target]
    return float(hit["wall_time_s"].iloc[0]) if len(hit) else math.inf


def varying(trials: pd.DataFrame) -> list[str]:
    """The spec fields the sweep varies: what tells one setting from another."""
    return [c for c in spec_columns(trials)
            if c not in NOT_A_SETTING and trials[c].astype(str).nunique() > 1]


def by_setting(trials: pd.DataFrame, keys: list[str], mode: str = "max") -> pd.DataFrame:
    """Medians over seeds of each setting. A seed without a final metric (its loss went NaN,
    or it never ran an epoch) counts as the worst result; min..max spans the others."""
    worst = -math.inf if mode == "max" else math.inf
    grouped = trials.assign(ranked=trials["final"].fillna(worst),
                            diverged=trials["status"] == "diverged").groupby(keys, sort=True,
                                                                            dropna=False)
    return pd.DataFrame({
        "seeds": grouped.size(),
        "diverged": grouped["diverged"].sum(),
        "samples_per_s": grouped["samples_per_s"].median(),
        "final": grouped["ranked"].median(),
        "final_min": grouped["final"].min(),
        "final_max": grouped["final"].max(),
        "time_to_target": grouped["time_to_target"].median(),
        "global_batch": grouped["global_batch"].median(),
    }).reset_index()


# --- speedup and scaling efficiency -------------------------------------------------------------

def speedup_table(trials: pd.DataFrame, scale: str = "workers") -> pd.DataFrame:
    """One row per setting and N; empty when the sweep does not vary `scale`."""
    keys = [*[c for c in varying(trials) if c != scale], "scaling"]
    if scale not in varying(trials):
        return pd.DataFrame()
    table = by_setting(trials, [*keys, scale])
    table["speedup"] = table["samples_per_s"] / at_one(table, keys, scale, "samples_per_s")
    table["efficiency"] = table["speedup"] / table[scale]
    table["ttt_speedup"] = [a / b if math.isfinite(a) and math.isfinite(b) else math.nan
                            for a, b in zip(at_one(table, keys, scale, "time_to_target"),
                                            table["time_to_target"], strict=True)]
    table["vs_local"] = vs_local(table, keys, scale)
    return table


def at_one(table: pd.DataFrame, keys: list[str], scale: str, col: str) -> list[float]:
    """Each row's `col` in the row of its setting with N = 1 (nan where the sweep has none)."""
    ref = {key(r, keys): r[col] for _, r in table[table[scale] == 1].iterrows()}
    return [ref.get(key(r, keys), math.nan) for _, r in table.iterrows()]


def vs_local(table: pd.DataFrame, keys: list[str], scale: str) -> list[float]:
    """Throughput against `local` on one worker with the same other settings."""
    if "strategy" not in keys:
        return [math.nan] * len(table)
    others = [k for k in keys if k != "strategy"]
    local = table[(table["strategy"] == "local") & (table[scale] == 1)]
    ref = {key(r, others): r["samples_per_s"] for _, r in local.iterrows()}
    return [r["samples_per_s"] / ref.get(key(r, others), math.nan) for _, r in table.iterrows()]


def key(row: pd.Series, keys: list[str]) -> tuple[str, ...]:
    return tuple(str(row[k]) for k in keys)


# --- optimizers -------------------------------------------------------------------------------

def best_table(trials: pd.DataFrame, mode: str) -> pd.DataFrame:
    """Per optimizer, its best setting by the median final metric over seeds (DeepOBS); a tie
    (ddp follows local to round-off) goes to the setting that reaches the target first."""
    keys = ["optimizer", *[c for c in varying(trials) if c != "optimizer"]]
    table = by_setting(trials, keys, mode)
    best = table.sort_values(["final", "time_to_target", "samples_per_s"],
                             ascending=[mode == "min", True, False], kind="stable").groupby(
        "optimizer", sort=True).head(1)
    best = best.sort_values("optimizer").reset_index(drop=True)
    best.insert(1, "setting", [setting(r, keys[1:]) for _, r in best.iterrows()])
    return best


def setting(row: pd.Series, keys: list[str]) -> str:
    return ", ".join(f"{k}={fmt_value(row[k])}" for k in keys) or "(the only one)"


def matches(trials: pd.DataFrame, row: pd.Series, keys: list[str]) -> pd.Series:
    mask = pd.Series(True, index=trials.index)
    for k in keys:
        mask &= trials[k].astype(str) == str(row[k])
    return mask


# --- plots --------------------------------------------------------------------------------------

def plot_speedup(table: pd.DataFrame, scale: str, path: Path) -> None:
    """Measured throughput speedup, efficiency and time-to-target speedup per strategy (and
    mode, where the sweep has both); dashed, the plan's prediction where given."""
    fig, axes = figures.subplots(1, 3, figsize=(14, 4))
    modes = sorted(table["scaling"].unique())
    label = table["strategy"] if "strategy" in table else pd.Series("run", index=table.index)
    if len(modes) > 1:
        label = label + " (" + table["scaling"] + ")"
    ns = sorted(table[scale].unique())
    for name, rows in table.groupby(label, sort=True):
        curve = rows.groupby(scale)[["speedup", "efficiency", "ttt_speedup", "predicted"]].median()
        if len(curve) < 2:
            continue  # a baseline with one N draws no line
        (line,) = axes[0].plot(curve.index, curve["speedup"], "o-", label=name)
        axes[1].plot(curve.index, curve["efficiency"], "o-", label=name)
        axes[2].plot(curve.index, curve["ttt_speedup"], "o-", label=name)
        if curve["predicted"].notna().any():
            color = line.get_color()
            axes[0].plot(curve.index, curve["predicted"], "x--", color=color, label=f"{name} (plan)")
            axes[1].plot(curve.index, curve["predicted"] / curve.index, "x--", color=color,
                         label=f"{name} (plan)")
    report_bound.draw(axes, table, scale)
    axes[0].plot(ns, ns, "k--", label="ideal")
    axes[1].plot(ns, [1.0] * len(ns), "k--", label="ideal")
    axes[2].plot(ns, ns, "k--", label="ideal")
    for ax, what in zip(axes, ("throughput speedup", "scaling efficiency", "time-to-target speedup"),
                        strict=True):
        ax.set_xlabel(scale)
        ax.set_ylabel(what)
        ax.set_xticks(ns)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{' and '.join(modes)} scaling: speedup over {scale} = 1 (median over settings)")
    figures.save(fig, path)


def plot_curves(results: pd.DataFrame, trials: pd.DataFrame, best: pd.DataFrame, keys: list[str],
                metric: str, target: float | None, path: Path) -> None:
    fig, ax = figures.subplots(figsize=(7, 4.5))
    for _, row in best.iterrows():
        ids = trials.loc[matches(trials, row, keys), "trial_id"]
        runs = results[results["trial_id"].isin(ids)].dropna(subset=["epoch"])
        per_epoch = runs.groupby("epoch").agg(t=("wall_time_s", "median"), mid=(metric, "median"),
                                             lo=(metric, "min"), hi=(metric, "max"))
        ax.plot(per_epoch["t"], per_epoch["mid"], "o-", ms=3, label=row["optimizer"])
        ax.fill_between(per_epoch["t"], per_epoch["lo"], per_epoch["hi"], alpha=0.2)
    if target is not None:
        ax.axhline(target, color="k", ls="--", lw=1, label="target")
    ax.set_xlabel("wall-clock time since the start of training (s)")
    ax.set_ylabel(metric)
    ax.set_title("best setting per optimizer: median over seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend()
    figures.save(fig, path)


def lr_sensitivity(trials: pd.DataFrame, best: pd.DataFrame, keys: list[str],
                   mode: str) -> pd.DataFrame:
    """Final metric against lr, each optimizer at its best setting's other values."""
    others = [k for k in keys if k != "lr"]
    frames = [by_setting(trials[matches(trials, row, others)], ["optimizer", "lr"], mode)
              for _, row in best.iterrows()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def plot_lr(sens: pd.DataFrame, metric: str, path: Path) -> None:
    fig, ax = figures.subplots(figsize=(7, 4.5))
    finite = sens.assign(final=sens["final"].where(sens["final"].map(math.isfinite)))
    for name, rows in finite.groupby("optimizer", sort=True):
        ax.plot(rows["lr"], rows["final"], "o-", label=name)
        ax.fill_between(rows["lr"], rows["final_min"], rows["final_max"], alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"final {metric}")
    ax.set_title("lr sensitivity: median over seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend()
    figures.save(fig, path)




# --- the report -------------------------------------------------------------------------------

def write(folder: str | Path, plan: str | Path | None = None) -> Path:
    """DIR/report.md and its PNGs from DIR/results.csv (and the settings in DIR/sweep.yaml);
    with `plan`, a `raydist plan` table whose predicted speedups are set beside the measured."""
    root = Path(folder)
    predictions = load_plan(plan) if plan is not None else None
    results = read_results(root, folder)
    if results.empty or "epoch" not in results:
        raise ConfigError(f"{root / 'results.csv'}: holds no trials")
    sweep = load_sweep(root / "sweep.yaml") if (root / "sweep.yaml").exists() else SweepSpec({}, {})
    metric, mode, target, scale = sweep.metric, sweep.mode, sweep.target, sweep.scale
    if metric not in results:
        raise ConfigError(f"{root / 'results.csv'}: has no column '{metric}' (sweep.metric)")
    trials = per_trial(results, metric, mode, target)
    lines = [f"# Sweep report: {root.name}", "", summary(trials, metric, mode, target), ""]
    lines += machine_section(root)
    lines += speedup_section(trials, scale, root, predictions, sweep.plan)
    lines += optimizer_sections(results, trials, metric, mode, target, root)
    lines += memory_section.section(results, trials, root)  # trials that recorded memory only
    lines += profiles.section(results, trials, mode, target, root)  # several workloads only
    lines += timeline.section(root)
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    page = report_html.write(path)  # the same report as one self-contained page
    tracking.log_report(sweep.base.get("tracking"), root, [path, page, *sorted(root.glob("*.png"))])
    return path


def read_results(root: Path, folder: str | Path) -> pd.DataFrame:
    """DIR/results.csv, as the sweep wrote it; one ConfigError for every way it is not there."""
    if not root.exists():
        raise ConfigError(f"{folder}: no such folder")
    if not root.is_dir():
        raise ConfigError(f"{folder}: is a file; expected a sweep's results folder (holding results.csv)")
    if not (root / "results.csv").is_file():
        raise ConfigError(f"{folder}: no results.csv; run `raydist sweep FILE --out {folder}` first")
    try:
        return pd.read_csv(root / "results.csv")
    except pd.errors.EmptyDataError:
        raise ConfigError(f"{root / 'results.csv'}: holds no trials") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise ConfigError(f"{root / 'results.csv'}: cannot be read as CSV ({type(e).__name__})") from None


def summary(trials: pd.DataFrame, metric: str, mode: str, target: float | None) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in sorted(trials["status"].value_counts().items()))
    goal = f"target {metric} {'>=' if mode == 'max' else '<='} {target:g}" if target is not None \
        else "no target set"
    return (f"{len(trials)} trials ({counts}); metric {metric} ({mode}), {goal}. "
            "Every number below is computed from results.csv; see raydist/report/ for the rules.")


def machine_section(root: Path) -> list[str]:
    infos = [yaml.safe_load(p.read_text()) for p in sorted(root.glob("trials/*/machine.yaml"))]
    if not infos:
        return ["## Machine", "", "No trial wrote machine.yaml.", ""]
    table = pd.DataFrame(infos).astype(str).drop_duplicates()
    return ["## Machine", "", markdown(table), ""]


def speedup_section(trials: pd.DataFrame, scale: str, root: Path,
                    plan: pd.DataFrame | None = None, cluster: dict | None = None) -> list[str]:
    table = speedup_table(trials, scale)
    head = ["## Speedup and scaling efficiency", ""]
    if table.empty:
        return [*head, f"The sweep does not vary {scale}: nothing to compare.", ""]
    table["predicted"] = predicted(table, scale, plan)
    sole = str(trials["strategy"].iloc[0]) if "strategy" in trials else None  # where it does not vary
    table = report_bound.add(table, [c for c in varying(trials) if c != scale], scale, root, sole)
    plot_speedup(table, scale, root / "speedup.png")
    shown = table.assign(
        samples_per_s=table["samples_per_s"].map(lambda v: fmt(v, "{:.0f}")),
        speedup=table["speedup"].map(lambda v: fmt(v, "{:.2f}")),
        efficiency=table["efficiency"].map(lambda v: fmt(v, "{:.2f}")),
        vs_local=table["vs_local"].map(lambda v: fmt(v, "{:.2f}")),
        time_to_target=table["time_to_target"].map(fmt_time),
        ttt_speedup=table["ttt_speedup"].map(lambda v: fmt(v, "{:.2f}")),
        predicted=table["predicted"].map(lambda v: fmt(v, "{:.2f}")), **report_bound.shown(table))
    modes = sorted(table["scaling"].unique())
    extra = ["scaling"] * (len(modes) > 1) + ["global_batch"] * (table["global_batch"].nunique() > 1)
    cols = [*[c for c in varying(trials) if c != scale], scale, *extra, "seeds", "samples_per_s", "speedup",
            *(["predicted"] if plan is not None else []),
            "efficiency", *report_bound.columns(table), "vs_local", "time_to_target", "ttt_speedup"]
    legend = (f"Scaling: {' and '.join(MODES[m] for m in modes)}. "
              "speedup = samples/s(N) / samples/s(1); efficiency = speedup / N; ttt_speedup = "
              "time to target(1) / time to target(N); vs_local = samples/s / samples/s of local.")
    if plan is not None:
        legend += " predicted = the speedup `raydist plan` predicts for the strategy at N (dashed)."
    if report_bound.columns(table):
        legend += report_bound.LEGEND
    return [*head, legend, "", markdown(shown[cols]), "", "![speedup](speedup.png)", "",
            *report_bound.section(table, scale, root, cluster)]


MODES = {"strong": "strong (batch_size: the same global batch at every N)",
         "weak": "weak (batch_per_worker: the global batch grows with the replicas)"}


def load_plan(path: str | Path) -> pd.DataFrame:
    """A `raydist plan --out DIR` table: DIR/plan.csv, or the file itself."""
    p = Path(path)
    p = p / "plan.csv" if p.is_dir() else p
    if not p.is_file():
        raise ConfigError(f"{path}: no plan.csv; write one with `raydist plan ... --out DIR`")
    plan = pd.read_csv(p)
    if not {"strategy", "workers", "speedup"} <= set(plan.columns):
        raise ConfigError(f"{p}: not a raydist plan table (needs columns strategy, workers, speedup)")
    return plan


def predicted(table: pd.DataFrame, scale: str, plan: pd.DataFrame | None) -> list[float]:
    """The plan's speedup for each row's strategy at the row's N (nan where it has none)."""
    if plan is None or "strategy" not in table:
        return [math.nan] * len(table)
    ref = {(str(r.strategy), int(r.workers)): float(r.speedup) for r in plan.itertuples()}
    return [ref.get((str(s), int(n)), math.nan) for s, n in zip(table["strategy"], table[scale],
                                                                 strict=True)]


def optimizer_sections(results: pd.DataFrame, trials: pd.DataFrame, metric: str, mode: str,
                       target: float | None, root: Path) -> list[str]:
    best = best_table(trials, mode)
    keys = ["optimizer", *[c for c in varying(trials) if c != "optimizer"]]
    shown = pd.DataFrame({
        "optimizer": best["optimizer"], "best setting": best["setting"], "seeds": best["seeds"],
        "diverged": best["diverged"],
        f"final {metric} (median)": best["final"].map(lambda v: fmt(v, "{:.4f}")),
        "min..max": [f"{fmt(a, '{:.4f}')}..{fmt(b, '{:.4f}')}"
                     for a, b in zip(best["final_min"], best["final_max"], strict=True)],
        "time to target": best["time_to_target"].map(fmt_time)})
    plot_curves(results, trials, best, keys, metric, target, root / "curves.png")
    lines = ["## Best setting per optimizer", "",
             f"Chosen by the median over seeds of the final {metric} (a seed without one counts "
             "as the worst); min..max over the seeds that have one; time to target is the median "
             "over seeds. '-': no finite value.", "", markdown(shown), "",
             "## Validation metric vs wall-clock time", "", "![curves](curves.png)", ""]
    sens = lr_sensitivity(trials, best, keys, mode) if "lr" in keys else pd.DataFrame()
    lines += ["## Learning-rate sensitivity", ""]
    if sens.empty or sens.groupby("optimizer")["lr"].nunique().max() < 2:
        return [*lines, "The sweep tries one lr per optimizer: no sensitivity to show.", ""]
    plot_lr(sens, metric, root / "lr_sensitivity.png")
    grid = sens.pivot(index="lr", columns="optimizer", values="final").sort_index()
    grid = grid.map(lambda v: fmt(v, "{:.4f}")).reset_index()
    grid["lr"] = grid["lr"].map(fmt_value)
    return [*lines, f"Median final {metric} over seeds.", "", markdown(grid), "",
            "![lr sensitivity](lr_sensitivity.png)", ""]
