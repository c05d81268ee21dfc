"""Markdown tables of the toy study: one run (:func:`results_table`) and the mean ± standard
deviation over seeds (:func:`aggregate`, :func:`summary_table`), from ``metrics.json`` dicts."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["results_table", "aggregate", "summary_table"]


def _get(metrics: dict, var: str, solver: str, nfe: int, key: str) -> float | None:
    row = metrics["variants"][var]["solvers"].get(solver, {}).get(str(nfe))
    return None if row is None else row[key]


def _table_columns(cfg: dict) -> list[tuple[str, Any]]:
    """(header, getter(metrics, variant) -> float) for the summary tables."""
    nfes, solvers = cfg["nfe"], cfg["solvers"]
    hi = max(nfes)
    lo = 4 if 4 in nfes else min(nfes)
    cols: list[tuple[str, Any]] = []
    dist = "W2" if cfg["distance"] == "exact_w2" else "SW2"
    for solver, nfe in [("euler", lo), ("euler", hi), ("heun", hi)]:
        if solver in solvers:
            cols.append((f"{dist} {solver}-{nfe}", lambda m, v, s=solver, f=nfe: _get(m, v, s, f, "w2_mean")))
    s0 = "euler" if "euler" in solvers else solvers[0]
    cols.append((f"acc {s0}-{hi}", lambda m, v: _get(m, v, s0, hi, "accuracy")))
    cols.append((f"class-mean dist {s0}-{hi}", lambda m, v: _get(m, v, s0, hi, "class_mean_distance")))
    cols.append((f"overlap@{cfg['overlap_angle']:g}°", lambda m, v: m["variants"][v]["overlap"]["mean"]))
    cols.append(("mean angle (°)", lambda m, v: m["variants"][v]["overlap"]["angle_deg_mean"]))
    cols.append((f"path deviation S {s0}-{hi}", lambda m, v: _get(m, v, s0, hi, "path_deviation")))
    return cols


def _fmt(x: float | None) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return "inf"
    return f"{x:.3f}"


def results_table(metrics: dict) -> str:
    """Markdown summary of one study run."""
    cfg, ref = metrics["config"], metrics["reference"]
    cols = _table_columns(cfg)
    lines = [
        f"# Toy study `{cfg['preset']}` (dataset `{cfg['dataset']}`, model `{cfg['model']}`, seed {cfg['seed']})",
        "",
        f"{cfg['steps']} steps × batch {cfg['batch_size']}; {cfg['eval_per_class']} samples per class; "
        f"Bayes rate {ref['bayes_rate']:.3f}; true class-mean distance {ref['true_class_mean_distance']:.3f}; "
        f"distance between two true sample sets (metric floor) {ref['true_vs_true_distance']:.3f}.",
        "",
        "| variant | " + " | ".join(h for h, _ in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name, var in metrics["variants"].items():
        lines.append(f"| {var['label']} | " + " | ".join(_fmt(g(metrics, name)) for _, g in cols) + " |")
    return "\n".join(lines) + "\n"


def aggregate(all_metrics: list[dict]) -> dict[str, Any]:
    """Mean and sample standard deviation over seeds of every summary-table entry."""
    cfg = all_metrics[0]["config"]
    cols = _table_columns(cfg)
    out: dict[str, Any] = {"seeds": [m["config"]["seed"] for m in all_metrics], "columns": [h for h, _ in cols],
                           "variants": {}}
    for name, var in all_metrics[0]["variants"].items():
        row = {}
        for header, getter in cols:
            vals = [getter(m, name) for m in all_metrics]
            vals = [v for v in vals if v is not None]
            if not vals:
                row[header] = None
                continue
            mean = sum(vals) / len(vals)
            sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            row[header] = {"mean": mean, "std": sd, "values": vals}
        out["variants"][name] = {"label": var["label"], **row}
    refs = [m["reference"] for m in all_metrics]
    out["reference"] = {k: sum(r[k] for r in refs) / len(refs) for k in refs[0]}
    return out


def summary_table(agg: dict) -> str:
    """Markdown table of :func:`aggregate` (mean ± std over seeds)."""
    cols = agg["columns"]
    ref = agg["reference"]
    lines = [
        f"Seeds {agg['seeds']}: mean ± standard deviation over seeds. Bayes rate {ref['bayes_rate']:.3f}; "
        f"true class-mean distance {ref['true_class_mean_distance']:.3f}; metric floor "
        f"(two true sample sets) {ref['true_vs_true_distance']:.3f}.",
        "",
        "| variant | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for var in agg["variants"].values():
        cells = []
        for c in cols:
            v = var[c]
            cells.append("–" if v is None else f"{_fmt(v['mean'])} ± {_fmt(v['std'])}")
        lines.append(f"| {var['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
