"""Report sections built on paired differences over seeds (:mod:`deltafm.study.paired`):

* **against images seen** (:func:`section_paired_curves`): for each of the study's ``comparisons`` pairs
  [A, B], the paired difference d_s(n) = m_A(s, n) − m_B(s, n) of FD at every evaluation point n, its mean
  and 95% Student-t interval over seeds, as a table and as a figure (line and band per pair). With the pairs
  [ΔFM, FM], [FM+post-hoc, FM] and [ΔFM, FM+post-hoc] this separates how the ΔFM gain moves with training
  into the affine shift of the optimum (which FM+post-hoc has as well) and what the network learns on top;
* **against λ** (:func:`section_lambda`): when the study trains ΔFM at several λ, the final FD of the raw ΔFM
  arms, of their bias-corrected variants and of FM mapped post hoc to each λ, mean and 95% interval over seeds
  (the λ figure with controls), and the same as per-seed paired differences (:func:`lambda_paired`): ΔFM − FM,
  FM+post-hoc − FM, ΔFM − FM+post-hoc at the same λ and ΔFM+bc − FM.

Both appear only when the study has what they need (pairs with at least two evaluation points; raw ΔFM arms
at two or more λ > 0), so other studies' reports are unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltafm.study.markdown import table
from deltafm.study.paired import ci_text, mean_ci
from deltafm.study.results import Results

__all__ = ["paired_curve", "lambda_variants", "lambda_series", "lambda_paired", "section_paired_curves",
           "section_lambda"]


def paired_curve(r: Results, a: str, b: str, metric: str) -> list[tuple[int, float, float | None, float | None, int]]:
    """(images, mean, low, high, n) of the per-seed differences a − b at every curve point both variants have
    on at least one common seed (low/high None for one seed)."""
    out = []
    points = sorted({img for s in r.by_seed(a) for img, _ in r.curve(a, s, metric)})
    for img in points:
        diffs = []
        for s in sorted(set(r.by_seed(a)) & set(r.by_seed(b))):
            va, vb = dict(r.curve(a, s, metric)).get(img), dict(r.curve(b, s, metric)).get(img)
            if va is not None and vb is not None:
                diffs.append(va - vb)
        if diffs:
            out.append((img, *mean_ci(diffs), len(diffs)))
    return out


def _plot_paired(curves: dict[str, list[tuple]], path: Path, title: str, ylabel: str, xlabel: str,
                 xscale: float = 1.0, zero_line: bool = True, bars: bool = False,
                 reference: tuple[str, float] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, rows in curves.items():
        x = [row[0] / xscale for row in rows]
        (line,) = ax.plot(x, [row[1] for row in rows], marker="o", markersize=3, label=label)
        band = [(xi, row[2], row[3]) for xi, row in zip(x, rows) if row[2] is not None]
        if band and bars:  # 95% intervals as error bars (isolated points show them too)
            ax.errorbar([b[0] for b in band], [(b[1] + b[2]) / 2 for b in band], yerr=[(b[2] - b[1]) / 2 for b in band],
                        fmt="none", capsize=3, color=line.get_color())
        elif band:
            ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band], alpha=0.15,
                            color=line.get_color())
    if zero_line:
        ax.axhline(0.0, color="k", linewidth=0.8)
    if reference is not None:
        ax.axhline(reference[1], color="k", linestyle="--", linewidth=0.8, label=reference[0])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def section_paired_curves(R: Any) -> list[str]:
    """Paired ΔFD of the comparisons against images seen (module docstring); [] without such pairs."""
    r = R.r
    pairs = [p for p in R.st.get("comparisons") or [] if all(v in R.present for v in p)]
    curves = {f"{a} − {b}": paired_curve(r, a, b, "fd") for a, b in pairs}
    curves = {k: v for k, v in curves.items() if len(v) >= 2}
    if not curves:
        return []
    points = sorted({row[0] for rows in curves.values() for row in rows})
    rows = []
    for label, pts in curves.items():
        at = {row[0]: row for row in pts}
        rows.append([label, *[ci_text(*at[p][1:4]) if p in at else "–" for p in points]])
    path = _plot_paired(curves, R.fig_dir / f"{R.tag}-paired-curves.png",
                        f"paired ΔFD against images seen ({R.name})", "ΔFD (variant − baseline), 95% band",
                        "images seen (thousands)", xscale=1e3)
    return [f"{R.h} Paired ΔFD against images seen ({R.name}, mean [95% t-interval] over seeds)", "",
            "Each row is the per-seed difference variant − baseline of FD at every evaluation point (negative: the "
            "variant is better). ΔFM − FM is the whole gain, FM+post-hoc − FM the part an FM model gets from the "
            "affine shift of the optimum, ΔFM − FM+post-hoc what contrastive training adds beyond it.", ""] + \
        table(["variant − baseline", *[f"{p / 1000:g}k" if p >= 1000 else str(p) for p in points]], rows) + [""] + \
        R.figure(path, "paired ΔFD against images seen")


def lambda_variants(r: Results) -> dict[str, dict[float, str]]:
    """The variant names by λ for the raw ΔFM arms (``ΔFM``), their bias-corrected variants (``ΔFM + bc``) and
    FM mapped post hoc to λ (``FM + post-hoc``); only arms with the negatives and batch size of the λ = 0 arm
    count, and only variants with a final FD."""
    arms = r.study["arms"]
    base = next((a for a in arms if a.get("lam") == 0.0), None)
    if base is None:
        return {}
    same = [a for a in arms if a.get("batch_size") == base.get("batch_size")
            and a.get("negatives") == base.get("negatives")]
    out: dict[str, dict[float, str]] = {"ΔFM": {}, "ΔFM + bc": {}, "FM + post-hoc": {}}
    for a in same:
        for v in a["variants"]:
            if not r.final(v["name"], "fd"):
                continue
            if a["lam"] and v["map"] == "none":
                out["ΔFM"][a["lam"]] = v["name"]
            elif a["lam"] and v["map"] == "to_fm":
                out["ΔFM + bc"][a["lam"]] = v["name"]
            elif not a["lam"] and v["map"] == "to_delta" and v.get("lam"):
                out["FM + post-hoc"][v["lam"]] = v["name"]
    return out


def lambda_series(r: Results) -> dict[str, dict[float, list[float]]]:
    """Final FD per seed by λ for the three series of :func:`lambda_variants`."""
    return {kind: {lam: list(r.final(name, "fd").values()) for lam, name in by_lam.items()}
            for kind, by_lam in lambda_variants(r).items()}


def _final_diffs(r: Results, a: str, b: str) -> list[float]:
    """Per-seed differences of the final FD, a − b, on the seeds both have."""
    fa, fb = r.final(a, "fd"), r.final(b, "fd")
    return [fa[s] - fb[s] for s in sorted(set(fa) & set(fb))]


def lambda_paired(r: Results, baseline: str) -> dict[str, dict[float, list[float]]]:
    """Per-seed paired differences of the final FD by λ: the whole gain ΔFM − FM, the shift FM + post-hoc − FM,
    the learned part ΔFM − FM + post-hoc (both at the same λ) and ΔFM + bc − FM; ``baseline`` is FM."""
    v = lambda_variants(r)
    if not v:
        return {}
    pairs = {"ΔFM − FM": (v["ΔFM"], None), "FM + post-hoc − FM": (v["FM + post-hoc"], None),
             "ΔFM − FM + post-hoc": (v["ΔFM"], v["FM + post-hoc"]), "ΔFM + bc − FM": (v["ΔFM + bc"], None)}
    out: dict[str, dict[float, list[float]]] = {}
    for label, (left, right) in pairs.items():
        out[label] = {}
        for lam, name in left.items():
            other = baseline if right is None else right.get(lam)
            if other is not None and (d := _final_diffs(r, name, other)):
                out[label][lam] = d
    return out


def _by_lambda(series: dict[str, dict[float, list[float]]], lams: list[float]) -> list[tuple[str, list, list[str]]]:
    """Per series: its name, the points (λ, mean, low, high, n) at the λ it has values for, and its table row
    (mean [95% t-interval] (n=…) per λ of ``lams``, "–" where it has none)."""
    out = []
    for name, by_lam in series.items():
        pts = [(lam, *mean_ci(by_lam[lam]), len(by_lam[lam])) for lam in lams if by_lam.get(lam)]
        at = {p[0]: p for p in pts}
        out.append((name, pts, [name, *[f"{ci_text(*at[x][1:4])} (n={at[x][4]})" if x in at else "–"
                                        for x in lams]]))
    return out


def section_lambda(R: Any) -> list[str]:
    """Final FD against λ for ΔFM, ΔFM + bc and FM + post-hoc (module docstring); [] with fewer than two λ."""
    if R.r.scorer == "attributes":
        return []
    series = lambda_series(R.r)
    if len(series.get("ΔFM", {})) < 2:
        return []
    lams = sorted({lam for s in series.values() for lam in s})
    summary = _by_lambda(series, lams)
    rows, curves = [row for _, _, row in summary], {name: pts for name, pts, _ in summary}
    fm = list(R.r.final(R.st["baseline"], "fd").values())
    path = _plot_paired({k: v for k, v in curves.items() if v}, R.fig_dir / f"{R.tag}-lambda.png",
                        f"final FD against λ ({R.name})", "classifier-FD (95% intervals)", "λ", zero_line=False,
                        bars=True, reference=(f"{R.st['baseline']} (λ = 0)", sum(fm) / len(fm)) if fm else None)
    return [f"{R.h} FD against λ with its controls ({R.name}, end of training, mean [95% t-interval] over seeds)",
            "", "ΔFM trained at each λ, the same models sampled with the bias correction, and the FM model sampled "
            "through the post-hoc map to each λ's optimum (no contrastive training). FM itself is the λ = 0 "
            "point of the post-hoc row's arm; n is the number of seeds.", ""] + \
        table(["", *[f"λ={x:g}" for x in lams]], rows) + [""] + R.figure(path, "FD against λ") + \
        _section_lambda_paired(R)


def _section_lambda_paired(R: Any) -> list[str]:
    """The λ table as paired differences (:func:`lambda_paired`), shown once ΔFM − FM has at least two seeds at
    two or more λ: the training seed's shared part cancels, so the intervals are those the conclusions use."""
    paired = lambda_paired(R.r, R.st["baseline"])
    if sum(len(d) >= 2 for d in paired.get("ΔFM − FM", {}).values()) < 2:
        return []
    lams = sorted({lam for by_lam in paired.values() for lam in by_lam})
    summary = [s for s in _by_lambda(paired, lams) if s[1]]  # series without any λ left out
    rows, curves = [row for _, _, row in summary], {label: pts for label, pts, _ in summary}
    path = _plot_paired(curves, R.fig_dir / f"{R.tag}-lambda-paired.png", f"paired ΔFD against λ ({R.name})",
                        "ΔFD at the end of training (95% intervals)", "λ", bars=True)
    return ["Paired over seeds (negative: the first variant has the lower FD; ΔFM − FM + post-hoc compares the two "
            "at the same λ, i.e. what contrastive training adds beyond the shift of the optimum):", ""] + \
        table(["variant − baseline", *[f"λ={x:g}" for x in lams]], rows) + [""] + \
        R.figure(path, "paired ΔFD against λ")
