"""The FM-vs-ΔFM report: markdown tables and PNG figures from a ``deltafm compare`` results.json.

    python -m deltafm.eval.report --results runs/compare/X/results.json --out runs/compare/X/report
    python -m deltafm.eval.report --results R.json --figures docs/figures/compare --link-prefix figures/compare \\
        --update docs/RESULTS.md        # replaces the block between <!-- BEGIN compare:NAME --> and <!-- END ... -->

**Steps-to-match.** For a baseline variant B (FM) and another variant A (ΔFM) trained with the same seed,
the target is B's value at the end of training, y* = y_B(I_total). A curve y(I) (metric against images
seen, evaluated at I_1 < I_2 < ... ) first reaches it at

    I(y*) = I_{k−1} + (y* − y(I_{k−1})) (I_k − I_{k−1}) / (y(I_k) − y(I_{k−1}))

with k the first index where y(I_k) is at least as good as y* (linear interpolation between the two
evaluations around the crossing). The ratio I_B(y*) / I_A(y*) says how many times fewer images A needs
(> 1: A is faster). I_B(y*) is B's *own* first crossing of its final value: I_total when B's curve
improves to the end, earlier when it has flattened (then the ratio does not credit A for B's plateau,
and B against itself is exactly 1). If A is already as good at I_1, only I_A ≤ I_1 is known and the
ratio is a lower bound (reported as "≥"); if A never gets there, the ratio is below I_B / I_last
(reported "<").

**NFE-to-match.** The same with NFE in place of images: the target is B's value at the largest NFE of
the sweep (per solver), and the interpolation is linear in log NFE (the grid is geometric). Sample-based
FD is noisy, so on a flat stretch of B's curve the crossing points (and the ratio) move by the noise.

Ratios are computed per seed (A and B share the seed) and summarised as mean ± sample standard
deviation over the seeds where the crossing was interpolated, with every per-seed value listed.
Lower is better for ``fd``; higher for ``class_acc``, ``precision``, ``recall`` and ``is``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "METRICS",
    "Reach",
    "first_reach",
    "match_ratio",
    "steps_to_match",
    "nfe_to_match",
    "summarize",
    "format_ratio",
    "build_report",
    "write_report",
    "update_section",
    "main",
]

#: metric key -> (label, lower is better)
METRICS: dict[str, tuple[str, bool]] = {
    "fd": ("classifier-FD", True),
    "class_acc": ("class accuracy", False),
    "precision": ("precision", False),
    "recall": ("recall", False),
    "is": ("IS (classifier)", False),
}


# ----------------------------------------------------------------------------------------------------
# Ratios
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reach:
    """Where a curve first reaches a target: ``x`` and how it is known.

    ``kind``: ``"interpolated"`` (between two evaluations), ``"at_first"`` (already at the first
    evaluation: x is the first abscissa, an upper bound) or ``"never"`` (x is None).
    """

    x: float | None
    kind: str


def _better_or_equal(y: float, target: float, lower_is_better: bool) -> bool:
    return y <= target if lower_is_better else y >= target


def first_reach(xs: Sequence[float], ys: Sequence[float], target: float, lower_is_better: bool = True,
                log_x: bool = False) -> Reach:
    """First abscissa where the piecewise-linear curve (xs, ys) reaches ``target`` (see module docstring).

    ``xs`` must be increasing. With ``log_x`` the interpolation is linear in log x.
    """
    if len(xs) != len(ys) or not len(xs):
        raise ValueError("xs and ys must be non-empty and of equal length")
    if any(b <= a for a, b in zip(xs, xs[1:])):
        raise ValueError(f"xs must be strictly increasing, got {list(xs)}")
    for k, y in enumerate(ys):
        if y is None or not math.isfinite(y):
            continue
        if _better_or_equal(y, target, lower_is_better):
            if k == 0:
                return Reach(float(xs[0]), "at_first")
            y0, x0, x1 = ys[k - 1], xs[k - 1], xs[k]
            if y0 is None or not math.isfinite(y0) or y == y0:
                return Reach(float(x1), "interpolated")
            frac = (target - y0) / (y - y0)
            if log_x:
                return Reach(float(math.exp(math.log(x0) + frac * (math.log(x1) - math.log(x0)))), "interpolated")
            return Reach(float(x0 + frac * (x1 - x0)), "interpolated")
    return Reach(None, "never")


def match_ratio(x_ref: float, reach: Reach, x_last: float | None = None) -> tuple[float | None, str]:
    """``x_ref / reach.x`` and its relation to the truth: ``"="``, ``">="`` (at_first) or ``"<"`` (never,
    bound x_ref / x_last; None without ``x_last``)."""
    if reach.kind == "never":
        return (x_ref / x_last if x_last else None), "<"
    assert reach.x is not None
    return x_ref / reach.x, ("=" if reach.kind == "interpolated" else ">=")


def _to_match(base: Sequence[tuple[float, float]], other: Sequence[tuple[float, float]], lower_is_better: bool,
              log_x: bool) -> dict[str, Any]:
    base = sorted(base)
    other = sorted(other)
    target = base[-1][1]
    own = first_reach([p[0] for p in base], [p[1] for p in base], target, lower_is_better, log_x)
    assert own.x is not None  # the last point reaches its own value
    reach = first_reach([p[0] for p in other], [p[1] for p in other], target, lower_is_better, log_x)
    ratio, rel = match_ratio(own.x, reach, other[-1][0])
    if own.kind == "at_first":  # the baseline's own crossing is only bounded above: so is the ratio
        rel = {"=": "<=", ">=": "~", "<": "<"}[rel]
    return {"target": target, "x_ref": own.x, "x": reach.x, "kind": reach.kind, "ratio": ratio, "rel": rel}


def steps_to_match(base: Sequence[tuple[float, float]], other: Sequence[tuple[float, float]],
                   lower_is_better: bool = True) -> dict[str, Any]:
    """Images (or steps) ``other`` needs to reach ``base``'s final value, relative to what ``base`` needs.

    Curves are (x, y) pairs. Returns ``{"target", "x_ref", "x", "kind", "ratio", "rel"}``: x_ref is
    base's own first crossing of its final value, ratio = x_ref / x, rel its relation to the truth
    (``=``, ``>=``, ``<``, ``<=``, or ``~`` when both curves start at or below the target).
    """
    return _to_match(base, other, lower_is_better, log_x=False)


def nfe_to_match(base: Sequence[tuple[float, float]], other: Sequence[tuple[float, float]],
                 lower_is_better: bool = True) -> dict[str, Any]:
    """NFE ``other`` needs to reach ``base``'s value at its largest NFE, relative to the NFE ``base`` itself
    needs for it (log-NFE interpolation)."""
    return _to_match(base, other, lower_is_better, log_x=True)


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample std (ddof = 1; 0 for one value), n, min, max of the finite values."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0, "min": None, "max": None}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size),
            "min": float(v.min()), "max": float(v.max())}


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if abs(x) < 1e-9:  # round-off of a zero spread
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.2f}"


def _pm(values: Sequence[float | None], digits: int = 3) -> str:
    s = summarize(values)
    if s["n"] == 0:
        return "–"
    if s["n"] == 1:
        return _fmt(s["mean"], digits)
    return f"{_fmt(s['mean'], digits)} ± {_fmt(s['std'], 2)}"


def format_ratio(per_seed: Sequence[dict[str, Any]]) -> str:
    """"mean ± std (n/N interpolated; per seed: a, b, ≥c, <d)" for a list of match dicts."""
    if not per_seed:
        return "–"
    exact = [m["ratio"] for m in per_seed if m["rel"] == "=" and m["ratio"] is not None]
    parts = []
    for m in per_seed:
        r = m["ratio"]
        if r is None:
            parts.append("never")
        else:
            parts.append({"=": "", ">=": "≥", "<": "<", "<=": "≤", "~": "~"}[m["rel"]] + f"{r:.2f}")
    s = summarize(exact)
    head = "–" if s["n"] == 0 else (f"{s['mean']:.2f}" if s["n"] == 1 else f"{s['mean']:.2f} ± {s['std']:.2f}")
    return f"{head} ({s['n']}/{len(per_seed)} interpolated; per seed: {', '.join(parts)})"


# ----------------------------------------------------------------------------------------------------
# Reading results.json
# ----------------------------------------------------------------------------------------------------


class _Results:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.study = data["study"]
        self.name = self.study["name"]
        self.arms = {a["name"]: a for a in self.study["arms"]}
        self.variant_arm = {v["name"]: a["name"] for a in self.study["arms"] for v in a["variants"]}
        self.runs = data.get("runs", [])

    def variants(self) -> list[str]:
        return [v["name"] for a in self.study["arms"] for v in a["variants"]]

    def baseline_of(self, variant: str) -> str:
        return self.arms[self.variant_arm[variant]]["baseline"]

    def by_seed(self, variant: str) -> dict[int, dict[str, Any]]:
        arm = self.variant_arm[variant]
        return {r["seed"]: r["variants"][variant] for r in self.runs if r["arm"] == arm and variant in r["variants"]}

    def curve(self, variant: str, seed: int, metric: str) -> list[tuple[float, float]]:
        v = self.by_seed(variant).get(seed)
        if not v:
            return []
        return [(r["images"], r[metric]) for r in v["curve"] if r.get(metric) is not None]

    def final(self, variant: str, metric: str) -> dict[int, float]:
        """Per seed: the metric at the last curve point (only seeds whose curve reached total_images)."""
        total = self.study["total_images"]
        out = {}
        for seed, v in self.by_seed(variant).items():
            pts = [r for r in v["curve"] if r["images"] == total and r.get(metric) is not None]
            if pts:
                out[seed] = pts[-1][metric]
        return out

    def sweep(self, variant: str, seed: int, solver: str, metric: str) -> list[tuple[float, float]]:
        v = self.by_seed(variant).get(seed)
        if not v:
            return []
        return [(r["nfe"], r[metric]) for r in v["sweep"] if r["solver"] == solver and r.get(metric) is not None]

    def cfg(self, variant: str, seed: int, metric: str) -> list[tuple[float, float]]:
        v = self.by_seed(variant).get(seed)
        if not v:
            return []
        return [(r["w"], r[metric]) for r in v["cfg"] if r.get(metric) is not None]


# ----------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_band(curves: list[list[tuple[float, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xs = sorted({x for c in curves for x, _ in c})
    mean, std = [], []
    for x in xs:
        vals = [y for c in curves for xx, y in c if xx == x]
        mean.append(np.mean(vals))
        std.append(np.std(vals, ddof=1) if len(vals) > 1 else 0.0)
    return np.array(xs, dtype=float), np.array(mean), np.array(std)


def _style(r: _Results, variant: str) -> dict[str, Any]:
    """The same colour and marker for a variant in every figure (by its position in the study)."""
    import matplotlib

    i = r.variants().index(variant)
    markers = "os^vD<>p*hx+"
    colors = matplotlib.colormaps["tab20" if len(r.variants()) > 10 else "tab10"].colors
    return {"marker": markers[i % len(markers)], "color": colors[i % len(colors)], "markersize": 4,
            "linewidth": 1.4}


def _draw_band(ax: Any, r: _Results, variant: str, curves: list[list[tuple[float, float]]], label: str,
               xscale: float = 1.0) -> None:
    """Mean over seeds as a line, ±1 standard deviation as a shaded band, in the variant's style."""
    x, m, s = _mean_band(curves)
    style = _style(r, variant)
    ax.plot(x / xscale, m, label=label, **style)
    ax.fill_between(x / xscale, m - s, m + s, alpha=0.15, color=style["color"])


def _plot_curves(r: _Results, variants: list[str], path: Path, title: str) -> Path | None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    drawn = False
    for ax, metric in zip(axes, ("fd", "class_acc")):
        for v in variants:
            curves = [r.curve(v, s, metric) for s in r.by_seed(v)]
            curves = [c for c in curves if c]
            if not curves:
                continue
            _draw_band(ax, r, v, curves, f"{v} (n={len(curves)})", xscale=1e3)
            drawn = True
        ax.set_xlabel("images seen (thousands)")
        ax.set_ylabel(METRICS[metric][0])
        if metric == "fd":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return None
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_nfe(r: _Results, variants: list[str], solvers: list[str], path: Path, title: str) -> Path | None:
    plt = _plt()
    if not solvers:
        return None
    fig, axes = plt.subplots(2, len(solvers), figsize=(4 * len(solvers), 6.4), squeeze=False)
    drawn = False
    for j, solver in enumerate(solvers):
        for row, metric in enumerate(("fd", "class_acc")):
            ax = axes[row][j]
            for v in variants:
                curves = [r.sweep(v, s, solver, metric) for s in r.by_seed(v)]
                curves = [c for c in curves if c]
                if not curves:
                    continue
                _draw_band(ax, r, v, curves, v)
                drawn = True
            ax.set_xscale("log", base=2)
            if metric == "fd":
                ax.set_yscale("log")
            ax.set_xlabel("NFE")
            ax.set_ylabel(METRICS[metric][0])
            ax.set_title(solver, fontsize=9)
            ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return None
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _along_curves(r: _Results, v: str, view: str) -> list[list[tuple[float, float]]]:
    out = []
    for run in r.by_seed(v).values():
        a = run.get("along")
        if a and view in a:
            out.append(list(zip(a[view]["t"], a[view]["acc"])))
    return out


_VIEWS = {
    "trajectory": "own Euler path, conditioned on y",
    "noised_class": "noised test images, conditioned on y",
    "noised_null": "noised test images, null label",
}


def _plot_along(r: _Results, variants: list[str], path: Path, title: str) -> Path | None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    drawn = False
    for ax, (view, label) in zip(axes, _VIEWS.items()):
        for v in variants:
            curves = _along_curves(r, v, view)
            if not curves:
                continue
            _draw_band(ax, r, v, curves, v)
            drawn = True
        ax.set_xlabel("t (0 = noise, 1 = data)")
        ax.set_ylabel("classifier accuracy of x̂1")
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return None
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_cfg(r: _Results, variants: list[str], path: Path, title: str) -> Path | None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    drawn = False
    for ax, metric in zip(axes, ("fd", "class_acc")):
        for v in variants:
            curves = [r.cfg(v, s, metric) for s in r.by_seed(v)]
            curves = [c for c in curves if c]
            if not curves:
                continue
            _draw_band(ax, r, v, curves, v)
            drawn = True
        ax.set_xlabel("guidance scale w")
        ax.set_ylabel(METRICS[metric][0])
        ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return None
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _paired(r: _Results, a: str, b: str, metric: str) -> list[float]:
    """Per-seed final metric differences a − b over the seeds both have."""
    fa, fb = r.final(a, metric), r.final(b, metric)
    return [fa[s] - fb[s] for s in sorted(set(fa) & set(fb))]


def _variant_desc(r: _Results, v: str) -> str:
    arm = r.arms[r.variant_arm[v]]
    spec = next(x for x in arm["variants"] if x["name"] == v)
    lam = arm.get("lam")
    parts = [f"λ={lam:g}" if lam is not None else "", f"{arm.get('negatives', '?')} neg." if lam else "",
             f"batch {arm.get('batch_size', '?')}"]
    if spec["map"] == "to_fm":
        parts.append("sampled with bias correction")
    elif spec["map"] == "to_delta":
        parts.append(f"FM mapped post hoc to the ΔFM optimum (λ={spec['lam']:g})")
    return ", ".join(p for p in parts if p)


def build_report(data: dict[str, Any], fig_dir: Path, link_prefix: str = "figures",
                 samples_dir: Path | None = None, heading_level: int = 3) -> str:
    """Markdown report of a results dict; figures are written into ``fig_dir`` and linked as
    ``link_prefix/<file>``; section headings have ``heading_level`` #'s. Returns the markdown."""
    h = "#" * heading_level
    r = _Results(data)
    st = r.study
    ev = st["eval"]
    name = r.name
    fig_dir.mkdir(parents=True, exist_ok=True)
    all_v = r.variants()
    present = [v for v in all_v if r.by_seed(v)]
    main = [v for v in (st.get("main_variants") or all_v) if v in present]
    base_name = st["baseline"]
    lines: list[str] = []
    link = (lambda f: f"{link_prefix.rstrip('/')}/{f}") if link_prefix else (lambda f: f)

    # ---- setup ------------------------------------------------------------------------------------
    cls = data.get("classifier") or {}
    lines += [f"{h} Setup ({name})", ""]
    if st.get("description"):
        lines += [st["description"].strip(), ""]
    seeds_done = sorted({run["seed"] for run in r.runs})
    has_cfg = any("cfg" in a.get("stages", ["cfg"]) for a in st["arms"])
    lines += [
        f"- Base training config: `{st['base']}`; study config: `{st.get('source')}`; overrides for every arm: "
        + (", ".join(f"`{k}={v}`" for k, v in st.get("overrides", {}).items()) or "none") + ".",
        f"- Budget: {st['total_images']:,} training images per run, evaluated every {st['eval_every_images']:,}; "
        f"study seeds {st['seeds']} (seeds with results: {seeds_done}).",
        f"- Curve sampler: {ev['curve']['solver']}, NFE {ev['curve']['nfe']}, {ev['curve']['num']} samples "
        f"(balanced classes), EMA weights, sample seed {ev['sample_seed']}, amp {ev['amp']}.",
        f"- Sweep: {', '.join(ev['sweep']['solvers'])} at NFE {ev['sweep']['nfe']} with {ev['sweep']['num']} "
        "samples" + (f"; CFG: w in {ev['cfg']['scales']} ({ev['cfg']['solver']}, NFE {ev['cfg']['nfe']}, "
                     f"{ev['cfg']['num']} samples)" if has_cfg else "") + ".",
    ]
    if cls:
        ref = cls.get("reference", {})
        acc = cls.get("test_accuracy")
        lines.append(f"- Metrics: classifier `{cls.get('id', '?')[:23]}…` trained on the {cls.get('dataset')} "
                     f"train split only, test accuracy {acc:.4f}; reference statistics of the "
                     f"{ref.get('split', '?')} split ({ref.get('count', '?')} images). FD in its "
                     f"{ref.get('feature_dim', '?')}-d penultimate features; precision/recall (k={ev['pr_k']}) "
                     "with equal-size real and generated sets." if acc is not None else
                     f"- Metrics: classifier `{cls.get('id', '?')}`.")
    lines.append("")
    rows = []
    for a in st["arms"]:
        secs = [run["train"].get("seconds") for run in r.runs if run["arm"] == a["name"]]
        rows.append([a["name"], ", ".join(v["name"] for v in a["variants"]), str(a.get("lam", "?")),
                     str(a.get("negatives", "?")), str(a.get("batch_size", "?")),
                     f"{len([s for s in secs if s])}/{len(a['seeds'])}", _pm([s / 60 for s in secs if s], 2)])
    lines += _table(["arm", "variants", "λ", "negatives", "batch", "seeds run", "train min/run"], rows) + [""]

    # ---- final quality ----------------------------------------------------------------------------
    lines += [f"{h} Final quality ({name}, {ev['curve']['solver']} NFE {ev['curve']['nfe']}, "
              f"{ev['curve']['num']} samples, mean ± sd over seeds)", ""]
    rows = []
    for v in present:
        vals = {m: list(r.final(v, m).values()) for m in METRICS}
        rows.append([v, _variant_desc(r, v), str(len(vals["fd"]))] + [_pm(vals[m]) for m in METRICS])
    lines += _table(["variant", "what", "n"] + [f"{METRICS[m][0]} {'↓' if METRICS[m][1] else '↑'}"
                                                 for m in METRICS], rows) + [""]

    # paired differences against each variant's baseline
    rows = []
    for v in present:
        b = r.baseline_of(v)
        if v == b or b not in present:
            continue
        d_fd, d_acc = _paired(r, v, b, "fd"), _paired(r, v, b, "class_acc")
        if not d_fd:
            continue
        wins = sum(1 for d in d_fd if d < 0)
        rows.append([v, b, str(len(d_fd)), _pm(d_fd), f"{wins}/{len(d_fd)}", _pm(d_acc)])
    if rows:
        lines += ["Paired differences at the end of training (same seed; negative ΔFD = better than the "
                  "baseline):", ""]
        lines += _table(["variant", "baseline", "n", "ΔFD (variant − baseline)", "seeds with lower FD",
                         "Δ class acc"], rows) + [""]

    # ---- curves and steps-to-match ----------------------------------------------------------------
    f = _plot_curves(r, main, fig_dir / f"{name}-curves.png", f"{name}: metric vs images seen (mean ± sd)")
    lines += [f"{h} Metric against images seen ({name})", ""]
    if f:
        lines += [f"![metric vs images]({link(f.name)})", ""]
    others = [v for v in present if v != r.baseline_of(v) and r.baseline_of(v) in present]
    if others:
        f2 = None
        abl = [v for v in present if v not in main]
        if abl:
            f2 = _plot_curves(r, [base_name] + abl if base_name in present else abl,
                              fig_dir / f"{name}-curves-ablations.png", f"{name}: ablation arms (mean ± sd)")
        if f2:
            lines += [f"![ablations vs images]({link(f2.name)})", ""]
        lines += ["Steps-to-match: images the baseline needs to first reach its final value, divided by the "
                  "images the variant needs to reach that value (> 1: the variant is faster; ≥: already reached "
                  "at the first evaluation; <: never reached within the budget).", ""]
        rows = []
        for v in others:
            b = r.baseline_of(v)
            cells = [v, b]
            for metric in ("fd", "class_acc"):
                lower = METRICS[metric][1]
                per = []
                for seed in sorted(set(r.by_seed(v)) & set(r.by_seed(b))):
                    cb, co = r.curve(b, seed, metric), r.curve(v, seed, metric)
                    if cb and co and cb[-1][0] == st["total_images"]:
                        per.append(steps_to_match(cb, co, lower))
                target = _pm([m["target"] for m in per])
                cells += [target, format_ratio(per)]
            rows.append(cells)
        lines += _table(["variant", "baseline", "target FD", "steps-to-match (FD)", "target acc",
                         "steps-to-match (acc)"], rows) + [""]

    # ---- one-seed comparison of every arm (λ, negatives, batch size) ------------------------------
    seed0 = st["seeds"][0]
    rows = []
    for v in present:
        if seed0 not in r.final(v, "fd"):
            continue
        arm = r.arms[r.variant_arm[v]]
        b = r.baseline_of(v)
        fd, acc = r.final(v, "fd")[seed0], r.final(v, "class_acc")[seed0]
        bfd = r.final(b, "fd").get(seed0) if b in present else None
        cb, co = r.curve(b, seed0, "fd"), r.curve(v, seed0, "fd")
        stm = "–"
        if v != b and cb and co and cb[-1][0] == st["total_images"]:
            m = steps_to_match(cb, co)
            stm = "never" if m["ratio"] is None else {"=": "", ">=": "≥", "<": "<", "<=": "≤", "~": "~"}[m["rel"]] + \
                f"{m['ratio']:.2f}"
        rows.append([v, f"{arm.get('lam', '?')}", str(arm.get("negatives", "?")), str(arm.get("batch_size", "?")),
                     _fmt(fd), _fmt(acc), b, "–" if v == b or bfd is None else _fmt(fd - bfd), stm])
    if len(rows) > 1:
        lines += [f"{h} All arms on seed {seed0} (λ, negatives, batch size; paired with the baseline of the same "
                  f"batch size)", ""]
        lines += _table(["variant", "λ", "negatives", "batch", "final FD", "final acc", "baseline", "ΔFD",
                         "steps-to-match (FD)"], rows) + [""]

    # ---- NFE --------------------------------------------------------------------------------------
    solvers = [s for s in ev["sweep"]["solvers"]
               if any(r.sweep(v, seed, s, "fd") for v in present for seed in r.by_seed(v))]
    if solvers:
        sweep_v = [v for v in main if any(r.by_seed(v)[s]["sweep"] for s in r.by_seed(v))]
        f = _plot_nfe(r, sweep_v, solvers, fig_dir / f"{name}-nfe.png", f"{name}: metric vs NFE (mean ± sd)")
        lines += [f"{h} Metric against NFE ({name})", ""]
        if f:
            lines += [f"![metric vs NFE]({link(f.name)})", ""]
        for solver in solvers:
            nfes = sorted({n for v in sweep_v for s in r.by_seed(v) for n, _ in r.sweep(v, s, solver, "fd")})
            rows = []
            for v in sweep_v:
                cells = [v]
                for n in nfes:
                    vals = [dict(r.sweep(v, s, solver, "fd")).get(n) for s in r.by_seed(v)]
                    accs = [dict(r.sweep(v, s, solver, "class_acc")).get(n) for s in r.by_seed(v)]
                    cells.append(f"{_pm(vals)} / {_pm(accs, 2)}")
                rows.append(cells)
            lines += [f"{solver}: classifier-FD / class accuracy (mean ± sd over seeds) at each NFE", ""]
            lines += _table(["variant"] + [f"NFE {n}" for n in nfes], rows) + [""]
        rows = []
        for v in sweep_v:
            b = r.baseline_of(v)
            if v == b or b not in present:
                continue
            for solver in solvers:
                cells = [v, b, solver]
                for metric in ("fd", "class_acc"):
                    per = []
                    for seed in sorted(set(r.by_seed(v)) & set(r.by_seed(b))):
                        sb, so = r.sweep(b, seed, solver, metric), r.sweep(v, seed, solver, metric)
                        if sb and so:
                            per.append(nfe_to_match(sb, so, METRICS[metric][1]))
                    cells.append(format_ratio(per))
                rows.append(cells)
        if rows:
            lines += ["NFE-to-match: the NFE the baseline needs to first reach its value at its largest NFE, divided "
                      "by the NFE the variant needs to reach that value (log-NFE interpolation; > 1: the variant "
                      "needs fewer evaluations).", ""]
            lines += _table(["variant", "baseline", "solver", "NFE-to-match (FD)", "NFE-to-match (acc)"], rows)
            lines += [""]

    # ---- along the path ---------------------------------------------------------------------------
    along_v = [v for v in present if any(run.get("along") for run in r.by_seed(v).values())]
    if along_v:
        f = _plot_along(r, along_v, fig_dir / f"{name}-along.png",
                        f"{name}: classifier accuracy of the predicted clean sample x̂1 along t (mean ± sd)")
        lines += [f"{h} Class separation along the path: Fig. 4 analogue ({name})", ""]
        if f:
            lines += [f"![accuracy of x-hat along t]({link(f.name)})", ""]
        lines += ["Accuracy of the classifier on x̂1 = path.velocity_to_data(v, x_t, t) (clipped to [−1, 1]), "
                  "mean over seeds:", ""]
        for view, label in _VIEWS.items():
            ts = None
            rows = []
            for v in along_v:
                curves = _along_curves(r, v, view)
                if not curves:
                    continue
                x, m, s = _mean_band(curves)
                idx = list(range(0, len(x), max(1, len(x) // 6)))
                if len(x) - 1 not in idx:
                    idx.append(len(x) - 1)
                ts = [x[i] for i in idx]
                rows.append([v] + [f"{m[i]:.3f}" for i in idx])
            if rows and ts is not None:
                lines += [f"{label}:", ""]
                lines += _table(["variant"] + [f"t={t:.2f}" for t in ts], rows) + [""]

    # ---- CFG --------------------------------------------------------------------------------------
    cfg_v = [v for v in present if any(run["cfg"] for run in r.by_seed(v).values())]
    if cfg_v:
        f = _plot_cfg(r, cfg_v, fig_dir / f"{name}-cfg.png", f"{name}: classifier-free guidance (mean ± sd)")
        lines += [f"{h} Classifier-free guidance ({name}; {ev['cfg']['solver']} NFE {ev['cfg']['nfe']}, "
                  f"{ev['cfg']['num']} samples)", ""]
        if f:
            lines += [f"![cfg]({link(f.name)})", ""]
        ws = sorted({w for v in cfg_v for s in r.by_seed(v) for w, _ in r.cfg(v, s, "fd")})
        rows = []
        for v in cfg_v:
            cells = [v]
            for w in ws:
                fd = [dict(r.cfg(v, s, "fd")).get(w) for s in r.by_seed(v)]
                acc = [dict(r.cfg(v, s, "class_acc")).get(w) for s in r.by_seed(v)]
                cells.append(f"{_pm(fd)} / {_pm(acc, 2)}")
            rows.append(cells)
        lines += ["classifier-FD / class accuracy at each w (w = 1, no guidance, is in the NFE table):", ""]
        lines += _table(["variant"] + [f"w={w:g}" for w in ws], rows) + [""]

    # ---- sample grids -----------------------------------------------------------------------------
    # copied from OUT/samples when there, else the copies already in fig_dir are linked
    grids = []
    for v in main:
        src = (samples_dir / v / f"seed{min(r.by_seed(v))}.png") if samples_dir is not None else None
        dst = fig_dir / f"{name}-samples-{v}.png"
        if src is not None and src.is_file():
            shutil.copyfile(src, dst)
        if dst.is_file():
            grids.append((v, dst))
    if grids:
        lines += [f"{h} Samples ({name}, first seed, curve sampler; one row per class)", ""]
        lines += [" ".join(f"![{v}]({link(p.name)})" for v, p in grids), "",
                  " · ".join(f"{i + 1}: {v}" for i, (v, _) in enumerate(grids)), ""]
    return "\n".join(lines).rstrip() + "\n"


def update_section(md_path: Path, name: str, content: str) -> None:
    """Replace the text between ``<!-- BEGIN compare:NAME -->`` and ``<!-- END compare:NAME -->``."""
    begin, end = f"<!-- BEGIN compare:{name} -->", f"<!-- END compare:{name} -->"
    text = md_path.read_text()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"{md_path} has no block {begin} ... {end}; add those two lines where the report goes")
    block = f"{begin}\n<!-- generated by python -m deltafm.eval.report; do not edit by hand -->\n\n{content}\n{end}"
    md_path.write_text(pattern.sub(lambda _: block, text))


def write_report(results_path: str | Path, out_dir: str | Path, fig_dir: str | Path | None = None,
                 link_prefix: str | None = None, update: str | Path | None = None,
                 heading_level: int = 3) -> Path:
    """Write ``out_dir/REPORT.md`` (and figures) from a results.json; optionally update a markdown block
    (whose section headings get ``heading_level`` #'s; REPORT.md always uses 3)."""
    results_path, out_dir = Path(results_path), Path(out_dir)
    data = json.loads(results_path.read_text())
    fig = Path(fig_dir) if fig_dir is not None else out_dir / "figures"
    prefix = link_prefix if link_prefix is not None else "figures"
    samples = results_path.parent / "samples"
    md = build_report(data, fig, prefix, samples_dir=samples)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "REPORT.md"
    path.write_text(f"## FM vs ΔFM: {data['study']['name']}\n\n{md}")
    if update is not None:
        if heading_level != 3:
            md = build_report(data, fig, prefix, samples_dir=samples, heading_level=heading_level)
        update_section(Path(update), data["study"]["name"], md)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deltafm.eval.report",
                                description="Markdown + PNG report from a deltafm compare results.json")
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--out", type=Path, help="folder for REPORT.md (default: next to results.json, report/)")
    p.add_argument("--figures", type=Path, help="folder for the PNGs (default OUT/figures)")
    p.add_argument("--link-prefix", help="how the markdown links the figures (default 'figures')")
    p.add_argument("--update", type=Path, help="markdown file whose compare:NAME block is replaced")
    p.add_argument("--heading-level", type=int, default=3, help="#'s of the section headings in the --update block")
    p.add_argument("--copy-results", type=Path, help="also copy results.json to this path")
    args = p.parse_args(argv)
    try:
        path = write_report(args.results, args.out or args.results.parent / "report", args.figures,
                            args.link_prefix, args.update, args.heading_level)
        if args.copy_results is not None:
            args.copy_results.parent.mkdir(parents=True, exist_ok=True)
            if args.copy_results.resolve() != args.results.resolve():
                shutil.copyfile(args.results, args.copy_results)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
