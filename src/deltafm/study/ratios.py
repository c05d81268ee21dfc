"""Steps-to-match and NFE-to-match: where a curve first reaches a baseline's value, and the ratio.

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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "METRICS",
    "PROMPT_METRICS",
    "CONDITION_METRICS",
    "Reach",
    "first_reach",
    "match_ratio",
    "steps_to_match",
    "nfe_to_match",
    "summarize",
    "format_ratio",
    "REL_PREFIX",
]

#: metric key -> (label, lower is better)
METRICS: dict[str, tuple[str, bool]] = {
    "fd": ("classifier-FD", True),
    "class_acc": ("class accuracy", False),
    "precision": ("precision", False),
    "recall": ("recall", False),
    "is": ("IS (classifier)", False),
    "kid": ("KID", True),       # when the study computes it (eval.kid_subsets)
}
#: the attribute reader's metrics of text arms (deltafm.study.attributes), with the same meaning
PROMPT_METRICS: dict[str, tuple[str, bool]] = {
    "fd": ("reader-FD", True),
    "kid": ("reader-KID", True),
    "prompt_acc": ("prompt accuracy", False),
    "agreement": ("agreement", False),
    **{f"acc.{k}": (f"{k} accuracy", False) for k in ("shape", "colour", "size", "cell", "count", "relation")},
}
#: ... and of multi-condition arms
CONDITION_METRICS: dict[str, tuple[str, bool]] = {
    "fd": ("reader-FD", True),
    "kid": ("reader-KID", True),
    "all_acc": ("all-conditions accuracy", False),
    **{f"acc.{k}": (f"{k} accuracy", False) for k in ("shape", "colour", "size", "cell")},
    "one_object": ("one object read", False),
}
#: How a ratio's relation to the truth is written in front of it.
REL_PREFIX = {"=": "", ">=": "≥", "<": "<", "<=": "≤", "~": "~"}


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
            parts.append(REL_PREFIX[m["rel"]] + f"{r:.2f}")
    s = summarize(exact)
    head = "–" if s["n"] == 0 else (f"{s['mean']:.2f}" if s["n"] == 1 else f"{s['mean']:.2f} ± {s['std']:.2f}")
    return f"{head} ({s['n']}/{len(per_seed)} interpolated; per seed: {', '.join(parts)})"
