"""Figures as PNG files, the one place raydist meets matplotlib's set-up (the report's plots,
`raydist plan`'s plan.png). A Figure made without pyplot draws with the Agg renderer when it is
saved: there is no backend to pick (no display on a cluster node or in CI), no pyplot figure
list to close, and a notebook or script that imports raydist keeps its own backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

DPI = 100


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float],
             **grid: Any) -> tuple[Figure, Any]:
    """A figure and its axes, as pyplot.subplots makes them (`grid`: squeeze, sharex,
    gridspec_kw, ...)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **grid)


def save(fig: Figure, path: Path, rect: tuple[float, float, float, float] | None = None) -> None:
    """`fig` laid out tight (within `rect`, the figure's share left to the axes: a legend may
    take the rest) and written to `path` as a PNG file."""
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=DPI)
