"""The report's figures: every panel draws, per variant, the mean over seeds as a line and ±1 standard
deviation as a band, in a colour and marker fixed by the variant's position in the study.

One skeleton (:func:`_figure`) lays out the panels, draws the bands, puts the legend on the first
panel and writes the PNG; the figures only say which curves go in which panel and how its axes
are labelled: metric vs images seen (:func:`plot_curves`), metric vs NFE per solver (:func:`plot_nfe`),
classifier accuracy along t (:func:`plot_along`), metric vs guidance scale (:func:`plot_cfg`) and, for
multi-condition arms, metric vs the weight on one part (:func:`plot_part_cfg`). The paired comparisons at
the end of training have their own figure (:func:`plot_paired_final`): one row per pair, each seed's difference
as a dot, the mean with its 95% t-interval as a bar, and the equivalence margin as a band.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltafm.study.ratios import METRICS
from deltafm.study.results import VIEWS, Curve, Results, mean_band

__all__ = ["plot_curves", "plot_nfe", "plot_along", "plot_cfg", "plot_part_cfg", "plot_paired_final"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(r: Results, variant: str) -> dict[str, Any]:
    """The same colour and marker for a variant in every figure (by its position in the study)."""
    import matplotlib

    i = r.variants().index(variant)
    markers = "os^vD<>p*hx+"
    colors = matplotlib.colormaps["tab20" if len(r.variants()) > 10 else "tab10"].colors
    return {"marker": markers[i % len(markers)], "color": colors[i % len(colors)], "markersize": 4,
            "linewidth": 1.4}


def _draw_band(ax: Any, r: Results, variant: str, curves: list[Curve], label: str, xscale: float = 1.0) -> None:
    """Mean over seeds as a line, ±1 standard deviation as a shaded band, in the variant's style."""
    x, m, s = mean_band(curves)
    style = _style(r, variant)
    ax.plot(x / xscale, m, label=label, **style)
    ax.fill_between(x / xscale, m - s, m + s, alpha=0.15, color=style["color"])


@dataclass
class _Axes:
    """How a panel's axes are labelled and scaled."""

    xlabel: str
    ylabel: str
    title: str | None = None
    xlog2: bool = False
    ylog: bool = False
    ylim: tuple[float, float] | None = None

    def apply(self, ax: Any) -> None:
        if self.xlog2:
            ax.set_xscale("log", base=2)
        if self.ylog:
            ax.set_yscale("log")
        ax.set_xlabel(self.xlabel)
        ax.set_ylabel(self.ylabel)
        if self.title is not None:
            ax.set_title(self.title, fontsize=9)
        if self.ylim is not None:
            ax.set_ylim(*self.ylim)
        ax.grid(alpha=0.3)


@dataclass
class _Panel:
    """One panel: its grid position, the per-seed curves of a variant, and its axes."""

    row: int
    col: int
    curves: Callable[[str], list[Curve]]
    axes: _Axes
    label: Callable[[str, int], str] = field(default=lambda v, n: v)
    xscale: float = 1.0


def _figure(r: Results, variants: list[str], panels: list[_Panel], shape: tuple[int, int],
            figsize: tuple[float, float], path: Path, title: str) -> Path | None:
    """Draw ``panels`` on a ``shape`` grid and save to ``path``; None (nothing written) when no panel has
    a curve."""
    plt = _plt()
    fig, axes = plt.subplots(*shape, figsize=figsize, squeeze=False)
    drawn = False
    for p in panels:
        ax = axes[p.row][p.col]
        for v in variants:
            curves = p.curves(v)
            if not curves:
                continue
            _draw_band(ax, r, v, curves, p.label(v, len(curves)), xscale=p.xscale)
            drawn = True
        p.axes.apply(ax)
    if not drawn:
        plt.close(fig)
        return None
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: the two metrics of a figure (FD, then an accuracy) unless told otherwise
_PAIR = ("fd", "class_acc")
Labels = dict[str, tuple[str, bool]]


def _metric_axes(metric: str, xlabel: str, labels: Labels | None = None, **kw: Any) -> _Axes:
    return _Axes(xlabel, (labels or METRICS)[metric][0], **kw)


def plot_curves(r: Results, variants: list[str], path: Path, title: str, metrics: tuple[str, str] = _PAIR,
                labels: Labels | None = None) -> Path | None:
    """FD (log scale) and an accuracy (default: class accuracy) against images seen (thousands); ``labels``:
    metric key -> (axis label, lower is better), default :data:`~deltafm.study.ratios.METRICS`."""
    panels = [_Panel(0, j, lambda v, m=metric: r.seed_curves(v, r.curve, m),
                     _metric_axes(metric, "images seen (thousands)", labels, ylog=metric == "fd"),
                     label=lambda v, n: f"{v} (n={n})", xscale=1e3)
              for j, metric in enumerate(metrics)]
    return _figure(r, variants, panels, (1, 2), (10, 3.8), path, title)


def plot_nfe(r: Results, variants: list[str], solvers: list[str], path: Path, title: str,
             metrics: tuple[str, str] = _PAIR, labels: Labels | None = None) -> Path | None:
    """FD (top row) and an accuracy (bottom row) against NFE (log₂), one column per solver."""
    if not solvers:
        return None
    panels = [_Panel(row, j, lambda v, s=solver, m=metric: r.seed_curves(v, r.sweep, s, m),
                     _metric_axes(metric, "NFE", labels, title=solver, xlog2=True, ylog=metric == "fd"))
              for j, solver in enumerate(solvers) for row, metric in enumerate(metrics)]
    return _figure(r, variants, panels, (2, len(solvers)), (4 * len(solvers), 6.4), path, title)


def plot_along(r: Results, variants: list[str], path: Path, title: str) -> Path | None:
    """Classifier accuracy of x̂1 against t, one panel per view (:data:`~deltafm.study.results.VIEWS`)."""
    panels = [_Panel(0, j, lambda v, w=view: r.along(v, w),
                     _Axes("t (0 = noise, 1 = data)", "classifier accuracy of x̂1", title=label, ylim=(0, 1.02)))
              for j, (view, label) in enumerate(VIEWS.items())]
    return _figure(r, variants, panels, (1, 3), (13, 3.8), path, title)


def plot_cfg(r: Results, variants: list[str], path: Path, title: str, metrics: tuple[str, str] = _PAIR,
             labels: Labels | None = None) -> Path | None:
    """FD and an accuracy against the (joint) guidance scale w."""
    panels = [_Panel(0, j, lambda v, m=metric: r.seed_curves(v, r.cfg, m),
                     _metric_axes(metric, "guidance scale w", labels))
              for j, metric in enumerate(metrics)]
    return _figure(r, variants, panels, (1, 2), (10, 3.8), path, title)


def plot_part_cfg(r: Results, variants: list[str], parts: list[str], path: Path, title: str, acc: str,
                  labels: Labels) -> Path | None:
    """Guidance on one part at a time: FD (top row), the accuracy ``acc`` (middle) and the guided part's own
    accuracy (bottom) against its weight w, one column per part."""
    rows = ("fd", acc, None)
    panels = [_Panel(i, j, lambda v, p=part, m=metric: r.seed_curves(v, r.part_cfg, p, m or f"acc.{p}"),
                     _Axes(f"weight w on {part}", labels.get(metric or f"acc.{part}", (f"{part} accuracy",))[0]))
              for j, part in enumerate(parts) for i, metric in enumerate(rows)]
    return _figure(r, variants, panels, (3, len(parts)), (4 * len(parts), 9), path, title)


def plot_paired_final(rows: list[tuple[str, list[float], tuple[float, float] | None]], path: Path, title: str,
                      xlabel: str, margin: float | None = None) -> Path | None:
    """Forest plot of paired differences: for each (label, per-seed differences, 95% interval or None) a row
    with the seeds as dots, the mean as a square and the interval as a bar; ±``margin`` shaded when given.
    None (nothing written) without rows."""
    rows = [row for row in rows if row[1]]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 0.55 * len(rows) + 1.3))
    if margin:
        ax.axvspan(-margin, margin, color="0.85", label=f"equivalence margin ±{margin:g}")
    ax.axvline(0.0, color="k", linewidth=0.8)
    for i, (_, diffs, ci) in enumerate(rows):
        y = len(rows) - 1 - i
        offsets = [(j - (len(diffs) - 1) / 2) * 0.25 / max(len(diffs), 1) for j in range(len(diffs))]
        ax.scatter(diffs, [y + 0.18 + o for o in offsets], s=10, color="tab:blue", alpha=0.7,
                   label="one training seed" if i == 0 else None)
        mean = sum(diffs) / len(diffs)
        if ci is not None:
            ax.errorbar([mean], [y], xerr=[[mean - ci[0]], [ci[1] - mean]], fmt="s", color="k", capsize=4,
                        markersize=5, label="mean, 95% t-interval" if i == 0 else None)
        else:
            ax.plot([mean], [y], "s", color="k", markersize=5)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([row[0] for row in reversed(rows)], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
