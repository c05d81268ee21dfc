"""Markdown helpers of the study report: number formatting and tables."""

from __future__ import annotations

import math
from collections.abc import Sequence

from deltafm.study.ratios import summarize

__all__ = ["fmt", "pm", "table"]


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if abs(x) < 1e-9:  # round-off of a zero spread
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.2f}"


def pm(values: Sequence[float | None], digits: int = 3) -> str:
    s = summarize(values)
    if s["n"] == 0:
        return "–"
    if s["n"] == 1:
        return fmt(s["mean"], digits)
    return f"{fmt(s['mean'], digits)} ± {fmt(s['std'], 2)}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out
