"""Paired comparisons with confidence intervals: variant A against variant B on the seeds both have.

For seeds s = 1..n the paired differences d_s = m_A(s) − m_B(s) of a final metric (same seed: same
initialisation and data order for both arms) give the mean d̄, the sample standard deviation s_d and the
95% Student-t interval

    d̄ ± t_{0.975, n−1} · s_d / √n

(none for n < 2). The interval assumes the seed-to-seed differences are roughly normal; with 3 seeds it is
wide (t_{0.975, 2} = 4.30), which is the honest statement of what 3 seeds can tell apart.

**Equivalence** within a margin δ stated before the data (the study's ``equivalence`` map, e.g.
``{fd: 0.25}``) is the two one-sided tests (TOST) at level α = 0.05: A and B are declared equivalent when
both H0: μ_d ≤ −δ and H0: μ_d ≥ δ are rejected, i.e. when the 90% (= 1 − 2α) t-interval of d̄ lies inside
(−δ, δ). "Not shown" means the data cannot exclude a difference of δ, not that there is one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from deltafm.study.markdown import fmt, table
from deltafm.study.results import Curve, Results

__all__ = ["t_interval", "mean_ci", "ci_text", "equivalence", "paired_final", "paired_cfg", "paired_sweep",
           "section_comparisons"]


def t_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """(mean, low, high) of the ``level`` Student-t interval of the mean of ``diffs``; None when n < 2."""
    n = len(diffs)
    if n < 2:
        return None
    from scipy.stats import t as student_t

    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def equivalence(diffs: Sequence[float], margin: float, alpha: float = 0.05) -> tuple[bool, float, float] | None:
    """(equivalent, low, high): TOST at level ``alpha`` with margin ``margin`` > 0 (module docstring), from the
    (1 − 2α) t-interval (low, high) of the mean of ``diffs``; None when n < 2."""
    if not margin > 0:
        raise ValueError(f"an equivalence margin must be > 0, got {margin}")
    ci = t_interval(diffs, level=1 - 2 * alpha)
    if ci is None:
        return None
    return (-margin < ci[1] and ci[2] < margin), ci[1], ci[2]


def paired_final(r: Results, a: str, b: str, metric: str) -> list[float]:
    """Per-seed differences a − b of the final curve metric over the seeds both reached."""
    fa, fb = r.final(a, metric), r.final(b, metric)
    return [fa[s] - fb[s] for s in sorted(set(fa) & set(fb))]


def _paired_at(r: Results, a: str, b: str, points: Callable[[str, int], Curve], x: float) -> list[float]:
    """Per-seed differences a − b of the value at abscissa ``x`` of ``points(variant, seed)`` (one of the
    :class:`Results` accessors) over the seeds where both variants have it."""
    out = []
    for s in sorted(set(r.by_seed(a)) & set(r.by_seed(b))):
        va, vb = dict(points(a, s)).get(x), dict(points(b, s)).get(x)
        if va is not None and vb is not None:
            out.append(va - vb)
    return out


def paired_cfg(r: Results, a: str, b: str, metric: str, w: float) -> list[float]:
    """Per-seed differences a − b of the guided metric at scale ``w`` over the seeds both have."""
    return _paired_at(r, a, b, lambda v, s: r.cfg(v, s, metric), w)


def paired_sweep(r: Results, a: str, b: str, metric: str, solver: str, nfe: int) -> list[float]:
    """Per-seed differences a − b of the sweep metric of ``solver`` at ``nfe`` over the seeds both have."""
    return _paired_at(r, a, b, lambda v, s: r.sweep(v, s, solver, metric), nfe)


def mean_ci(values: Sequence[float]) -> tuple[float, float | None, float | None]:
    """(mean, low, high) of the 95% t-interval of ``values`` (one or more); low and high are None for one
    value."""
    ci = t_interval(values)
    return ci if ci is not None else (values[0], None, None)


def ci_text(mean: float | None, low: float | None = None, high: float | None = None) -> str:
    """``mean [low, high]``, or the mean alone without an interval, or "–" without a mean."""
    if mean is None:
        return "–"
    return fmt(mean) if low is None else f"{fmt(mean)} [{fmt(low)}, {fmt(high)}]"


def _ci(diffs: list[float]) -> str:
    return ci_text(*mean_ci(diffs)) if diffs else "–"


def _equivalent(diffs: list[float], margin: float) -> str:
    e = equivalence(diffs, margin)
    if e is None:
        return "–"
    return f"{'yes' if e[0] else 'not shown'} [{fmt(e[1])}, {fmt(e[2])}]"


def section_comparisons(R: Any) -> list[str]:
    """The study's extra pairs ([variant, baseline]): paired differences of FD (and KID when the units have it)
    and the main accuracy (``R.acc``) with 95% t-intervals over seeds, at the end of training and at each
    joint guidance scale; with the study's ``equivalence`` margins, the TOST verdict per metric."""
    r, pairs = R.r, [p for p in R.st.get("comparisons") or [] if all(v in R.present for v in p)]
    if not pairs:
        return []
    ws = sorted({w for v in R.present for s in r.by_seed(v) for w, _ in r.cfg(v, s, "fd")})
    kid = any(r.final(v, "kid") for v in R.present)
    margins = {m: float(d) for m, d in (R.st.get("equivalence") or {}).items()}
    rows = []
    for a, b in pairs:
        fd = paired_final(r, a, b, "fd")
        cells = [a, b, str(len(fd)), _ci(fd), f"{sum(d < 0 for d in fd)}/{len(fd)}",
                 _ci(paired_final(r, a, b, R.acc))]
        if kid:
            cells.append(_ci([1000 * d for d in paired_final(r, a, b, "kid")]))
        cells += [_equivalent(paired_final(r, a, b, m), d) for m, d in margins.items()]
        for w in ws:
            cells += [_ci(paired_cfg(r, a, b, "fd", w)), _ci(paired_cfg(r, a, b, R.acc, w))]
        rows.append(cells)
    head = ["variant", "baseline", "n", "ΔFD [95% CI]", "seeds lower", f"Δ {R.acc_short} [95% CI]"]
    if kid:
        head.append("ΔKID×10³ [95% CI]")
    head += [f"{m} within ±{d:g} (TOST, 90% CI)" for m, d in margins.items()]
    for w in ws:
        head += [f"ΔFD at w={w:g}", f"Δ acc at w={w:g}"]
    notes = ("Differences variant − baseline on the same seeds (negative ΔFD: the variant is better); the interval "
             "is Student's t on the per-seed differences.")
    if margins:
        notes += (" Equivalence: two one-sided t-tests at α = 0.05 with the margin stated in the study config "
                  "before the runs; 'yes' when the 90% interval lies inside ±margin, 'not shown' otherwise (the "
                  "data cannot exclude a difference of that size).")
    return [f"{R.h} Paired comparisons ({R.name}, end of training, mean [95% t-interval] over seeds)", "",
            notes, ""] + table(head, rows) + [""] + _forest(R, pairs, margins.get("fd")) + \
        _per_sampler(R, pairs, margins) + _per_attribute(R, pairs)


def _forest(R: Any, pairs: list[list[str]], margin: float | None) -> list[str]:
    """The pairs' final ΔFD as a forest plot (per-seed dots, mean and 95% interval, the FD margin)."""
    from deltafm.study.figures import plot_paired_final

    rows = []
    for a, b in pairs:
        d = paired_final(R.r, a, b, "fd")
        ci = t_interval(d)
        rows.append((f"{a} − {b}", d, None if ci is None else (ci[1], ci[2])))
    path = plot_paired_final(rows, R.fig_dir / f"{R.tag}-paired-final.png",
                             f"paired ΔFD at the end of training ({R.name})", "ΔFD (variant − baseline)", margin)
    return R.figure(path, "paired differences at the end of training")


def _per_sampler(R: Any, pairs: list[list[str]], margins: dict[str, float]) -> list[str]:
    """The same pairs' ΔFD for every sampler of the NFE sweep at its largest NFE (where each sampler is closest
    to its plateau), with the FD equivalence verdict: does the conclusion depend on the sampler?"""
    r = R.r
    at: dict[str, int] = {}
    for v in R.present:
        for s in r.by_seed(v):
            for solver in R.ev.get("sweep", {}).get("solvers", []):
                for n, _ in r.sweep(v, s, solver, "fd"):
                    at[solver] = max(at.get(solver, 0), n)
    if not at:
        return []
    rows, head = [], ["variant", "baseline"]
    for solver, n in at.items():
        head.append(f"ΔFD {solver} NFE {n}")
        if "fd" in margins:
            head.append(f"fd within ±{margins['fd']:g} ({solver})")
    for a, b in pairs:
        cells = [a, b]
        for solver, n in at.items():
            d = paired_sweep(r, a, b, "fd", solver, n)
            cells.append(_ci(d))
            if "fd" in margins:
                cells.append(_equivalent(d, margins["fd"]))
        rows.append(cells)
    return [f"The same pairs for each sampler of the NFE sweep at its largest NFE ({R.name}; ΔFD [95% CI]"
            + (", equivalence as above" if "fd" in margins else "") + "):", ""] + table(head, rows) + [""]


def _per_attribute(R: Any, pairs: list[list[str]]) -> list[str]:
    """Attribute-scored studies: the same pairs' differences in every per-attribute (per-condition) accuracy the
    units have, unguided and at each joint guidance scale (does ΔFM improve adherence to each condition?)."""
    if R.r.scorer != "attributes":
        return []
    r = R.r
    keys = [k for k in R.metrics if k.startswith("acc.") and any(r.final(v, k) for v in R.present)]
    if not keys:
        return []
    ws = sorted({w for v in R.present for s in r.by_seed(v) for w, _ in r.cfg(v, s, keys[0])})
    rows = []
    for a, b in pairs:
        for w in [1.0, *ws]:
            diffs = [paired_final(r, a, b, k) if w == 1.0 else paired_cfg(r, a, b, k, w) for k in keys]
            rows.append([a, b, "none" if w == 1.0 else f"{w:g}", *[_ci(d) for d in diffs]])
    return [f"Per-attribute accuracy, variant − baseline ({R.name}; positive: the variant follows that part of "
            "the prompt more often):", ""] + \
        table(["variant", "baseline", "guidance w", *[f"Δ {R.label(k)}" for k in keys]], rows) + [""]
