"""The timeline of a pipeline sweep: what each stage actor did in one recorded step
(`stage_events.json`, written by the run: pipeline/events.py), as a Gantt chart
(`timeline.png`: one row per stage actor, a colour per op kind, and beside it the schedule's
ideal timeline for equal stages and free communication, each with its bubble) and as a Chrome
trace (`timeline.json`: open it in chrome://tracing or ui.perfetto.dev; one process per trial,
one thread per stage actor). `raydist report` calls `section`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.patches import Patch

from raydist import figures
from raydist.strategies.pipeline import events
from raydist.strategies.pipeline.schedules import idle_share, simulate

COLOURS = {"F": "tab:blue", "B": "tab:orange", "W": "tab:green", "step": "tab:purple",
           "recv": "0.75", "send": "0.35", "sends": "0.55", "allreduce": "tab:red"}
BUSY = (*events.COMPUTE, "step")
"""Kinds that compute (the record's compute_s counts the optimizer step too)."""
SHOWN = 6
"""Trials drawn in timeline.png (all of them go to timeline.json)."""

Trial = tuple[str, dict[str, Any]]
"""(trial id, its stage_events.json)"""


def section(root: Path) -> list[str]:
    """The report's timeline section: timeline.json and timeline.png from the trials' recorded
    steps; nothing when no trial recorded one (no pipeline trial)."""
    trials = [(p.parent.name, events.read(p)) for p in sorted(root.glob(f"trials/*/{events.EVENTS}"))]
    if not trials:
        return []
    (root / "timeline.json").write_text(json.dumps(chrome_trace(trials)))
    draw(trials[:SHOWN], root / "timeline.png")
    more = f" (the first {SHOWN} of {len(trials)} trials; all are in timeline.json)" \
        if len(trials) > SHOWN else ""
    return ["## Pipeline timeline", "",
            "What each stage actor did in one recorded step (the trial's `timeline_step`): forward "
            "(F), backward (B), weight pass (W), receives, sends, the flush of sends, the replicas' "
            "all-reduce and the optimizer step; below each, the schedule's ideal timeline for equal "
            f"stages and free communication (B = 2 F), with both bubbles{more}. Chrome trace: "
            "timeline.json (chrome://tracing, ui.perfetto.dev).", "", "![timeline](timeline.png)", ""]


def label(trial: Trial) -> str:
    tid, rec = trial
    extra = f", V={rec['chunks']}" if rec["chunks"] > 1 else ""
    extra += f", R={rec['replicas']}" if rec["replicas"] > 1 else ""
    return f"{tid}: {rec['schedule']}, K={rec['stages']}, M={rec['microbatches']}{extra}, step {rec['step']}"


def actor_name(actor: dict[str, Any]) -> str:
    return f"replica {actor['replica']} stage {actor['stage']}"


def op_name(kind: str, mb: int, chunk: int) -> str:
    if mb < 0:
        return kind
    return f"{kind}{mb}" + (f".{chunk}" if chunk else "")


def chrome_trace(trials: list[Trial]) -> dict[str, Any]:
    """Trace Event Format: complete events ("X", microseconds), names for processes and threads."""
    out: list[dict[str, Any]] = []
    for pid, trial in enumerate(trials):
        out.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": label(trial)}})
        for tid, actor in enumerate(trial[1]["actors"]):
            out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                        "args": {"name": actor_name(actor)}})
            for kind, mb, chunk, start, end in actor["events"]:
                out.append({"ph": "X", "name": op_name(kind, mb, chunk), "cat": kind, "pid": pid,
                            "tid": tid, "ts": start * 1e6, "dur": (end - start) * 1e6,
                            "args": {"micro_batch": mb, "chunk": chunk}})
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def measured_bubble(rec: dict[str, Any]) -> float:
    """The share of the actors' time in the step (first start to last end) not computing."""
    spans = [(s, e) for a in rec["actors"] for _, _, _, s, e in a["events"]]
    if not spans:
        return float("nan")
    busy = sum(e - s for a in rec["actors"] for k, _, _, s, e in a["events"] if k in BUSY)
    return 1 - busy / (len(rec["actors"]) * (max(e for _, e in spans) - min(s for s, _ in spans)))


def draw(trials: list[Trial], path: Path) -> None:
    rows = [len(rec["actors"]) + rec["stages"] for _, rec in trials]
    fig, axes = figures.subplots(2 * len(trials), 1, squeeze=False,
                             figsize=(11, 1.2 + 0.45 * sum(rows) + 0.9 * len(trials)),
                             gridspec_kw={"height_ratios": [h for _, rec in trials
                                                            for h in (len(rec["actors"]), rec["stages"])]})
    for i, trial in enumerate(trials):
        measured, ideal = axes[2 * i][0], axes[2 * i + 1][0]
        rec = trial[1]
        gantt(measured, [(actor_name(a), a["events"]) for a in rec["actors"]], scale=1e3)
        measured.set_title(f"{label(trial)}: measured, bubble {measured_bubble(rec):.2f}", fontsize=9)
        measured.set_xlabel("ms from the step's first op", fontsize=8)
        plan = simulate(rec["schedule"], rec["stages"], rec["microbatches"], rec["chunks"])
        gantt(ideal, [(f"stage {k}", ops) for k, ops in enumerate(plan)], scale=1.0)
        ideal.set_title(f"ideal {rec['schedule']} (equal stages, free communication): bubble "
                        f"{idle_share(plan):.2f}", fontsize=9)
        ideal.set_xlabel("forward times", fontsize=8)
    fig.legend(handles=[Patch(color=c, label=k) for k, c in COLOURS.items()], loc="upper center",
               ncol=len(COLOURS), fontsize=8, frameon=False)
    figures.save(fig, path, rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # the legend on top


def gantt(ax: Any, rows: list[tuple[str, list[Any]]], scale: float) -> None:
    """One bar row per actor, top to bottom; ops labelled with their micro-batch where wide enough."""
    span = max((e for _, evs in rows for *_, e in evs), default=1.0) * scale
    for y, (_, evs) in enumerate(rows):
        for kind, mb, chunk, start, end in evs:
            ax.barh(y, (end - start) * scale, left=start * scale, height=0.8, color=COLOURS[kind],
                    edgecolor="white", linewidth=0.3)
            if kind in events.COMPUTE and (end - start) * scale > span / 60:
                ax.text((start + end) / 2 * scale, y, op_name("", mb, chunk), ha="center", va="center",
                        fontsize=6, color="white")
    ax.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlim(0, span * 1.01)
