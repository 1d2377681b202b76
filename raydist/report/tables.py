"""What every report section writes with: numbers as table cells, pandas tables as Markdown
(figures as PNG files: raydist/figures/)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd


def fmt(value: float, pattern: str) -> str:
    """`pattern` of a finite number, else "-"."""
    return pattern.format(value) if value is not None and math.isfinite(value) else "-"


def fmt_time(value: float) -> str:
    """Seconds; "not reached" for an infinite time to target, "-" for none."""
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return "not reached" if math.isinf(value) else f"{value:.2f} s"


def fmt_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def markdown(table: pd.DataFrame) -> str:
    cells = table.astype(object).map(lambda v: fmt_value(v) if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(map(str, table.columns)) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)

