"""Report section: how much of the seed-to-seed spread of the final metrics is sampling noise.

A study with several sampling-noise seeds (``eval.sample_seeds``, k of them) scores every final unit k times
from the same checkpoint. With training seeds s = 1..n and noise seeds j = 1..k, x_sj is the metric of one
draw and x̄_s its mean over j (the unit's value, which every other table uses). Then

* the **sd over training seeds** is the sample sd of x̄_1..x̄_n: what the paired intervals are built from;
* the **noise sd** σ̂ is the pooled sd between noise seeds of one checkpoint, σ̂² = mean_s var_j(x_sj)
  (n(k − 1) degrees of freedom): the sampling error of *one* draw of the unit's size;
* the **noise share** (σ̂²/k) / var_s(x̄_s) estimates the part of the seed-to-seed variance of x̄ that is
  sampling noise, the rest being the training seed (initialisation and data order). Near 1, more samples per
  evaluation would narrow the intervals; near 0, only more training seeds would. It is a ratio of two
  estimates and can exceed 1 by chance.

The same for each ``comparisons`` pair [A, B] on the paired differences d_sj = A_sj − B_sj: both variants are
drawn with the same noise seeds, so the noise that the pair shares cancels in d, and what is left is the noise
that the paired intervals carry.

The section appears only when the final curve points keep their per-noise-seed values (``per_seed``), so other
studies' reports are unchanged.
"""

from __future__ import annotations

import math
from typing import Any

from deltafm.study.markdown import fmt, table
from deltafm.study.results import Results

__all__ = ["noise_split", "final_draws", "section_sampling_error"]


def final_draws(r: Results, variant: str, metric: str) -> dict[int, list[float]]:
    """Per training seed: the metric of each noise seed at the final curve point (seeds that kept them)."""
    rows = r.final_rows(variant, lambda p: metric in (p.get("per_seed") or {}))
    return {seed: [float(x) for x in row["per_seed"][metric]] for seed, row in rows.items()}


def noise_split(draws: list[list[float]]) -> dict[str, Any]:
    """The module docstring's quantities from draws x_sj (one list per training seed, all of length k ≥ 2):
    ``n``, ``k``, ``mean``, ``sd_seeds`` (sd of the unit means; None for n < 2), ``sd_noise`` (pooled σ̂) and
    ``noise_share`` ((σ̂²/k) / var of the unit means; None for n < 2 or a zero spread)."""
    k = len(draws[0])
    if k < 2 or any(len(d) != k for d in draws):
        raise ValueError(f"noise_split needs the same number (>= 2) of draws per seed, got {[len(d) for d in draws]}")
    n = len(draws)
    means = [sum(d) / k for d in draws]
    grand = sum(means) / n
    var_noise = sum(sum((x - m) ** 2 for x in d) / (k - 1) for d, m in zip(draws, means)) / n
    var_seeds = sum((m - grand) ** 2 for m in means) / (n - 1) if n > 1 else None
    share = (var_noise / k) / var_seeds if var_seeds else None
    return {"n": n, "k": k, "mean": grand, "sd_seeds": math.sqrt(var_seeds) if var_seeds is not None else None,
            "sd_noise": math.sqrt(var_noise), "noise_share": share}


def _row(label: str, draws: dict[int, list[float]], scale: float = 1.0) -> list[str] | None:
    if not draws:
        return None
    s = noise_split([[scale * x for x in d] for d in draws.values()])
    return [label, str(s["n"]), str(s["k"]), fmt(s["mean"]), fmt(s["sd_seeds"]), fmt(s["sd_noise"]),
            fmt(s["sd_noise"] / math.sqrt(s["k"])), fmt(s["noise_share"], 2)]


def _paired(a: dict[int, list[float]], b: dict[int, list[float]]) -> dict[int, list[float]]:
    return {s: [x - y for x, y in zip(a[s], b[s])] for s in sorted(set(a) & set(b)) if len(a[s]) == len(b[s])}


def section_sampling_error(R: Any) -> list[str]:
    """The sampling-error table of the final point (module docstring); [] without per-noise-seed values."""
    r = R.r
    metrics = [(m, scale, label) for m, scale, label in (("fd", 1.0, "FD"), ("kid", 1000.0, "KID×10³"))
               if any(final_draws(r, v, m) for v in R.present)]
    if not metrics or "fd" not in [m for m, _, _ in metrics]:
        return []
    pairs = [p for p in R.st.get("comparisons") or [] if all(v in R.present for v in p)]
    rows = []
    for m, scale, label in metrics:
        for v in R.main:
            rows.append(_row(f"{label} of {v}", final_draws(r, v, m), scale))
        for a, b in pairs:
            rows.append(_row(f"Δ{label} {a} − {b}", _paired(final_draws(r, a, m), final_draws(r, b, m)), scale))
    rows = [row for row in rows if row is not None]
    if not rows:
        return []
    num = r.study["eval"].get("curve", {}).get("num")
    return [f"{R.h} Sampling error of the final point ({R.name}, {num} samples per noise seed)", "",
            "Each final unit is scored once per sampling-noise seed (k) from the same checkpoint. *sd over training "
            "seeds*: the spread of the unit values (the mean over the k draws) that the intervals above are built "
            "from; *noise sd*: the pooled sd between the draws of one checkpoint (the error of one draw); *noise in "
            "a unit*: noise sd / √k; *noise share*: (noise sd² / k) / (sd over training seeds)², the part of the "
            "seed-to-seed variance that is sampling noise (an estimate; it can exceed 1 by chance). The Δ rows "
            "are paired: both variants are drawn with the same noise seeds.", ""] + \
        table(["quantity", "training seeds", "noise seeds k", "mean", "sd over training seeds", "noise sd",
               "noise in a unit", "noise share"], rows) + [""]
