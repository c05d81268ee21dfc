"""The FM-vs-ΔFM report: markdown tables and PNG figures from a ``deltafm compare`` results.json.

    python -m deltafm.study.report --results runs/compare/X/results.json --out runs/compare/X/report
    python -m deltafm.study.report --results R.json --figures docs/figures/compare --link-prefix figures/compare \\
        --update docs/RESULTS.md        # replaces the block between <!-- BEGIN compare:NAME --> and <!-- END ... -->

The report has one function per section (setup, final quality, metric against images seen with
steps-to-match, all arms on the first seed, metric against NFE with NFE-to-match, along the path,
guidance, sample grids); the ratios are :mod:`deltafm.study.ratios`, the figures
:mod:`deltafm.study.figures`. A study scored with the attribute reader gets the sections after the setup once
per prompt split (headings "NAME, SPLIT prompts"), with its metrics (:mod:`deltafm.study.report_context`) and
the per-part guidance table (:mod:`deltafm.study.report_attributes`); the paired sections are
:mod:`deltafm.study.paired` and :mod:`deltafm.study.report_paired`, the sampling-error table
:mod:`deltafm.study.report_noise`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deltafm.study import figures
from deltafm.study.markdown import fmt as _fmt
from deltafm.study.markdown import pm as _pm
from deltafm.study.markdown import table as _table
from deltafm.study.paired import section_comparisons as _section_comparisons
from deltafm.study.ratios import REL_PREFIX, format_ratio, nfe_to_match, steps_to_match
from deltafm.study.report_attributes import prompts_what, reader_line, section_part_cfg
from deltafm.study.report_context import ReportContext as _Report
from deltafm.study.report_noise import section_sampling_error
from deltafm.study.report_paired import section_lambda, section_paired_curves
from deltafm.study.results import VIEWS, Results, mean_band

__all__ = ["build_report", "write_report", "update_section", "require_section", "main"]

GENERATED_BY = "python -m deltafm.study.report"


# ----------------------------------------------------------------------------------------------------
# Markdown helpers
# ----------------------------------------------------------------------------------------------------


def _paired(r: Results, a: str, b: str, metric: str) -> list[float]:
    """Per-seed final metric differences a − b over the seeds both have."""
    fa, fb = r.final(a, metric), r.final(b, metric)
    return [fa[s] - fb[s] for s in sorted(set(fa) & set(fb))]


def _variant_desc(r: Results, v: str) -> str:
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


# ----------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------


def _setup_metrics_line(cls: dict[str, Any], pr_k: Any) -> str:
    ref = cls.get("reference", {})
    acc = cls.get("test_accuracy")
    if acc is None:
        return f"- Metrics: classifier `{cls.get('id', '?')}`."
    return (f"- Metrics: classifier `{cls.get('id', '?')[:23]}…` trained on the {cls.get('dataset')} "
            f"train split only, test accuracy {acc:.4f}; reference statistics of the "
            f"{ref.get('split', '?')} split ({ref.get('count', '?')} images). FD in its "
            f"{ref.get('feature_dim', '?')}-d penultimate features; precision/recall (k={pr_k}) "
            "with equal-size real and generated sets.")


def _section_setup(R: _Report) -> list[str]:
    r, st, ev, h = R.r, R.st, R.ev, R.h
    cls = r.data.get("classifier") or {}
    lines = [f"{h} Setup ({R.name})", ""]
    if st.get("description"):
        lines += [st["description"].strip(), ""]
    seeds_done = sorted({run["seed"] for run in r.runs})
    has_cfg = any("cfg" in a.get("stages", ["cfg"]) for a in st["arms"])
    has_sweep = any("sweep" in a.get("stages", ["sweep"]) for a in st["arms"])
    sweep = (f"Sweep: {', '.join(ev['sweep']['solvers'])} at NFE {ev['sweep']['nfe']} with {ev['sweep']['num']} "
             "samples" if has_sweep else "No NFE sweep")
    lines += [
        f"- Base training config: `{st['base']}`; study config: `{st.get('source')}`; overrides for every arm: "
        + (", ".join(f"`{k}={v}`" for k, v in st.get("overrides", {}).items()) or "none") + ".",
        f"- Budget: {st['total_images']:,} training images per run, evaluated every {st['eval_every_images']:,}; "
        f"study seeds {st['seeds']} (seeds with results: {seeds_done}).",
        f"- Curve sampler: {ev['curve']['solver']}, NFE {ev['curve']['nfe']}, {ev['curve']['num']} samples "
        f"({'balanced classes' if r.scorer != 'attributes' else prompts_what(r)}), EMA weights, sample seed "
        f"{ev['sample_seed']}, amp {ev['amp']}.",
        f"- {sweep}" + (f"; CFG: w in {ev['cfg']['scales']} ({ev['cfg']['solver']}, NFE {ev['cfg']['nfe']}, "
                         f"{ev['cfg']['num']} samples)" if has_cfg else "") + ".",
    ]
    if cls:
        lines.append(_setup_metrics_line(cls, ev["pr_k"]) if r.scorer != "attributes" else reader_line(cls))
    lines.append("")
    rows = []
    for a in st["arms"]:
        secs = [run["train"].get("seconds") for run in r.runs if run["arm"] == a["name"]]
        rows.append([a["name"], ", ".join(v["name"] for v in a["variants"]), str(a.get("lam", "?")),
                     str(a.get("negatives", "?")), str(a.get("batch_size", "?")),
                     f"{len([s for s in secs if s])}/{len(a['seeds'])}", _pm([s / 60 for s in secs if s], 2)])
    return lines + _table(["arm", "variants", "λ", "negatives", "batch", "seeds run", "train min/run"], rows) + [""]


def _section_final(R: _Report) -> list[str]:
    r, ev, present = R.r, R.ev, R.present
    lines = [f"{R.h} Final quality ({R.name}, {ev['curve']['solver']} NFE {ev['curve']['nfe']}, "
             f"{ev['curve']['num']} samples, mean ± sd over seeds)", ""]
    rows = []
    metrics = R.metrics
    for v in present:
        vals = {m: list(r.final(v, m).values()) for m in metrics}
        rows.append([v, _variant_desc(r, v), str(len(vals["fd"]))] + [_pm(vals[m]) for m in metrics])
    lines += _table(["variant", "what", "n"] + [f"{metrics[m][0]} {'↓' if metrics[m][1] else '↑'}"
                                                for m in metrics], rows) + [""]
    rows = []  # paired differences against each variant's baseline
    for v in present:
        b = r.baseline_of(v)
        if v == b or b not in present:
            continue
        d_fd, d_acc = _paired(r, v, b, "fd"), _paired(r, v, b, R.acc)
        if not d_fd:
            continue
        wins = sum(1 for d in d_fd if d < 0)
        rows.append([v, b, str(len(d_fd)), _pm(d_fd), f"{wins}/{len(d_fd)}", _pm(d_acc)])
    if rows:
        lines += ["Paired differences at the end of training (same seed; negative ΔFD = better than the "
                  "baseline):", ""]
        lines += _table(["variant", "baseline", "n", "ΔFD (variant − baseline)", "seeds with lower FD",
                         f"Δ {R.acc_short}"], rows) + [""]
    return lines


def _steps_to_match_rows(R: _Report, others: list[str]) -> list[list[str]]:
    r = R.r
    rows = []
    for v in others:
        b = r.baseline_of(v)
        cells = [v, b]
        for metric in ("fd", R.acc):
            per = []
            for seed in sorted(set(r.by_seed(v)) & set(r.by_seed(b))):
                cb, co = r.curve(b, seed, metric), r.curve(v, seed, metric)
                if cb and co and cb[-1][0] == R.st["total_images"]:
                    per.append(steps_to_match(cb, co, R.lower(metric)))
            cells += [_pm([m["target"] for m in per]), format_ratio(per)]
        rows.append(cells)
    return rows


def _section_curves(R: _Report) -> list[str]:
    """Metric against images seen with steps-to-match; [] when no curve has two points (a study evaluated at
    the end of training only)."""
    r, name, present, metrics = R.r, R.name, R.present, ("fd", R.acc)
    if max((len(r.curve(v, s, "fd")) for v in present for s in r.by_seed(v)), default=0) < 2:
        return []
    f = figures.plot_curves(r, R.main, R.fig_dir / f"{R.tag}-curves.png", f"{name}: metric vs images seen (mean ± sd)",
                            metrics, R.labels)
    lines = [f"{R.h} Metric against images seen ({name})", ""] + R.figure(f, "metric vs images")
    others = [v for v in present if v != r.baseline_of(v) and r.baseline_of(v) in present]
    if not others:
        return lines
    abl = [v for v in present if v not in R.main]
    if abl:
        base_name = R.st["baseline"]
        f2 = figures.plot_curves(r, [base_name] + abl if base_name in present else abl,
                                 R.fig_dir / f"{R.tag}-curves-ablations.png", f"{name}: ablation arms (mean ± sd)",
                                 metrics, R.labels)
        lines += R.figure(f2, "ablations vs images")
    lines += ["Steps-to-match: images the baseline needs to first reach its final value, divided by the "
              "images the variant needs to reach that value (> 1: the variant is faster; ≥: already reached "
              "at the first evaluation; <: never reached within the budget).", ""]
    return lines + _table(["variant", "baseline", "target FD", "steps-to-match (FD)", "target acc",
                           "steps-to-match (acc)"], _steps_to_match_rows(R, others)) + [""]


def _section_one_seed(R: _Report) -> list[str]:
    """Every arm on the first seed (λ, negatives, batch size), paired with its baseline."""
    r, st, present = R.r, R.st, R.present
    seed0 = st["seeds"][0]
    rows = []
    for v in present:
        if seed0 not in r.final(v, "fd"):
            continue
        arm = r.arms[r.variant_arm[v]]
        b = r.baseline_of(v)
        fd, acc = r.final(v, "fd")[seed0], r.final(v, R.acc).get(seed0)
        bfd = r.final(b, "fd").get(seed0) if b in present else None
        cb, co = r.curve(b, seed0, "fd"), r.curve(v, seed0, "fd")
        stm = "–"
        if v != b and len(cb) > 1 and co and cb[-1][0] == st["total_images"]:
            m = steps_to_match(cb, co)
            stm = "never" if m["ratio"] is None else REL_PREFIX[m["rel"]] + f"{m['ratio']:.2f}"
        rows.append([v, f"{arm.get('lam', '?')}", str(arm.get("negatives", "?")), str(arm.get("batch_size", "?")),
                     _fmt(fd), _fmt(acc), b, "–" if v == b or bfd is None else _fmt(fd - bfd), stm])
    if len(rows) <= 1:
        return []
    lines = [f"{R.h} All arms on seed {seed0} (λ, negatives, batch size; paired with the baseline of the same "
             f"batch size)", ""]
    return lines + _table(["variant", "λ", "negatives", "batch", "final FD", "final acc", "baseline", "ΔFD",
                           "steps-to-match (FD)"], rows) + [""]


def _nfe_table(R: _Report, sweep_v: list[str], solver: str) -> list[str]:
    r = R.r
    nfes = sorted({n for v in sweep_v for s in r.by_seed(v) for n, _ in r.sweep(v, s, solver, "fd")})
    rows = []
    for v in sweep_v:
        cells = [v]
        for n in nfes:
            vals = [dict(r.sweep(v, s, solver, "fd")).get(n) for s in r.by_seed(v)]
            accs = [dict(r.sweep(v, s, solver, R.acc)).get(n) for s in r.by_seed(v)]
            cells.append(f"{_pm(vals)} / {_pm(accs, 2)}")
        rows.append(cells)
    lines = [f"{solver}: {R.label('fd')} / {R.label(R.acc)} (mean ± sd over seeds) at each NFE", ""]
    return lines + _table(["variant"] + [f"NFE {n}" for n in nfes], rows) + [""]


def _nfe_to_match_rows(R: _Report, sweep_v: list[str], solvers: list[str]) -> list[list[str]]:
    r = R.r
    rows = []
    for v in sweep_v:
        b = r.baseline_of(v)
        if v == b or b not in R.present:
            continue
        for solver in solvers:
            cells = [v, b, solver]
            for metric in ("fd", R.acc):
                per = []
                for seed in sorted(set(r.by_seed(v)) & set(r.by_seed(b))):
                    sb, so = r.sweep(b, seed, solver, metric), r.sweep(v, seed, solver, metric)
                    if sb and so:
                        per.append(nfe_to_match(sb, so, R.lower(metric)))
                cells.append(format_ratio(per))
            rows.append(cells)
    return rows


def _section_nfe(R: _Report) -> list[str]:
    r, name, present = R.r, R.name, R.present
    solvers = [s for s in R.ev["sweep"]["solvers"]
               if any(r.sweep(v, seed, s, "fd") for v in present for seed in r.by_seed(v))]
    if not solvers:
        return []
    sweep_v = [v for v in R.main if any(r.by_seed(v)[s]["sweep"] for s in r.by_seed(v))]
    f = figures.plot_nfe(r, sweep_v, solvers, R.fig_dir / f"{R.tag}-nfe.png", f"{name}: metric vs NFE (mean ± sd)",
                         ("fd", R.acc), R.labels)
    lines = [f"{R.h} Metric against NFE ({name})", ""] + R.figure(f, "metric vs NFE")
    for solver in solvers:
        lines += _nfe_table(R, sweep_v, solver)
    one_nfe = all(len(r.sweep(v, seed, solver, "fd")) < 2
                  for v in sweep_v for seed in r.by_seed(v) for solver in solvers)
    rows = [] if one_nfe else _nfe_to_match_rows(R, sweep_v, solvers)  # one NFE: no curve to match on
    if rows:
        lines += ["NFE-to-match: the NFE the baseline needs to first reach its value at its largest NFE, divided "
                  "by the NFE the variant needs to reach that value (log-NFE interpolation; > 1: the variant "
                  "needs fewer evaluations).", ""]
        lines += _table(["variant", "baseline", "solver", "NFE-to-match (FD)", "NFE-to-match (acc)"], rows)
        lines += [""]
    return lines


def _section_along(R: _Report) -> list[str]:
    r, name = R.r, R.name
    along_v = [v for v in R.present if any(run.get("along") for run in r.by_seed(v).values())]
    if not along_v:
        return []
    f = figures.plot_along(r, along_v, R.fig_dir / f"{R.tag}-along.png",
                           f"{name}: classifier accuracy of the predicted clean sample x̂1 along t (mean ± sd)")
    lines = [f"{R.h} Class separation along the path: Fig. 4 analogue ({name})", ""]
    lines += R.figure(f, "accuracy of x-hat along t")
    lines += ["Accuracy of the classifier on x̂1 = path.velocity_to_data(v, x_t, t) (clipped to [−1, 1]), "
              "mean over seeds:", ""]
    for view, label in VIEWS.items():
        ts = None
        rows = []
        for v in along_v:
            curves = r.along(v, view)
            if not curves:
                continue
            x, m, _ = mean_band(curves)
            idx = list(range(0, len(x), max(1, len(x) // 6)))
            if len(x) - 1 not in idx:
                idx.append(len(x) - 1)
            ts = [x[i] for i in idx]
            rows.append([v] + [f"{m[i]:.3f}" for i in idx])
        if rows and ts is not None:
            lines += [f"{label}:", ""]
            lines += _table(["variant"] + [f"t={t:.2f}" for t in ts], rows) + [""]
    return lines


def _section_cfg(R: _Report) -> list[str]:
    r, name, ev = R.r, R.name, R.ev
    cfg_v = [v for v in R.present if any(r.cfg(v, s, "fd") for s in r.by_seed(v))]
    if not cfg_v:
        return []
    f = figures.plot_cfg(r, cfg_v, R.fig_dir / f"{R.tag}-cfg.png", f"{name}: classifier-free guidance (mean ± sd)",
                         ("fd", R.acc), R.labels)
    lines = [f"{R.h} Classifier-free guidance ({name}; {ev['cfg']['solver']} NFE {ev['cfg']['nfe']}, "
             f"{ev['cfg']['num']} samples)", ""] + R.figure(f, "cfg")
    ws = sorted({w for v in cfg_v for s in r.by_seed(v) for w, _ in r.cfg(v, s, "fd")})
    rows = []
    for v in cfg_v:
        cells = [v]
        for w in ws:
            fd = [dict(r.cfg(v, s, "fd")).get(w) for s in r.by_seed(v)]
            acc = [dict(r.cfg(v, s, R.acc)).get(w) for s in r.by_seed(v)]
            cells.append(f"{_pm(fd)} / {_pm(acc, 2)}")
        rows.append(cells)
    where = "w = 1, no guidance, is in the NFE table" if R.r.scorer != "attributes" else "joint guidance: every " \
        "condition nulled in the unconditional branch; w = 1 is no guidance"
    lines += [f"{R.label('fd')} / {R.label(R.acc)} at each w ({where}):", ""]
    return lines + _table(["variant"] + [f"w={w:g}" for w in ws], rows) + [""]


def _section_grids(R: _Report) -> list[str]:
    """Sample grids: copied from OUT/samples when there, else the copies already in fig_dir are linked."""
    grids = []
    for v in R.main:
        src = None
        if R.samples_dir is not None:
            folder = R.samples_dir / v if R.r.split is None else R.samples_dir / v / R.r.split
            src = folder / f"seed{min(R.r.by_seed(v))}.png"
        dst = R.fig_dir / f"{R.tag}-samples-{v}.png"
        if src is not None and src.is_file():
            shutil.copyfile(src, dst)
        if dst.is_file():
            grids.append((v, dst))
    if not grids:
        return []
    what = "one row per class" if R.r.split is None else "the split's first prompts, each under its image"
    return [f"{R.h} Samples ({R.name}, first seed, curve sampler; {what})", "",
            " ".join(f"![{v}]({R.link(p.name)})" for v, p in grids), "",
            " · ".join(f"{i + 1}: {v}" for i, (v, _) in enumerate(grids)), ""]


#: the sections after the setup, once per prompt split of an attribute-scored study (once otherwise)
_SECTIONS = (_section_final, _section_comparisons, section_sampling_error, section_paired_curves, _section_curves,
             _section_one_seed, section_lambda, _section_nfe, _section_along,
             _section_cfg, section_part_cfg, _section_grids)


def build_report(data: dict[str, Any], fig_dir: Path, link_prefix: str = "figures",
                 samples_dir: Path | None = None, heading_level: int = 3) -> str:
    """Markdown report of a results dict; figures are written into ``fig_dir`` and linked as
    ``link_prefix/<file>``; section headings have ``heading_level`` #'s. Returns the markdown."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    link = (lambda f: f"{link_prefix.rstrip('/')}/{f}") if link_prefix else (lambda f: f)
    R = _Report(Results(data), "#" * heading_level, fig_dir, link, samples_dir)
    lines = _section_setup(R)
    for view in R.r.views():
        Rv = dataclasses.replace(R, r=R.r.view(view))
        for section in _SECTIONS:
            lines += section(Rv)
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------


def _block(md_path: Path, name: str, kind: str) -> tuple[str, re.Pattern[str], str, str]:
    """The file's text, the pattern of its ``KIND:NAME`` block and the block's two marker lines; ValueError when
    the file has no such block."""
    begin, end = f"<!-- BEGIN {kind}:{name} -->", f"<!-- END {kind}:{name} -->"
    text = md_path.read_text()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"{md_path} has no block {begin} ... {end}; add those two lines where the report goes")
    return text, pattern, begin, end


def require_section(md_path: Path, name: str, kind: str = "compare") -> None:
    """Raise ValueError unless ``md_path`` has the ``KIND:NAME`` block (checked before long work that ends by
    writing it)."""
    _block(md_path, name, kind)


def update_section(md_path: Path, name: str, content: str, kind: str = "compare",
                   generated_by: str = GENERATED_BY) -> None:
    """Replace the text between ``<!-- BEGIN KIND:NAME -->`` and ``<!-- END KIND:NAME -->`` (KIND: ``compare``
    for a study's report, ``checks`` for its metric checks)."""
    text, pattern, begin, end = _block(md_path, name, kind)
    block = f"{begin}\n<!-- generated by {generated_by}; do not edit by hand -->\n\n{content}\n{end}"
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=GENERATED_BY, description="Markdown + PNG report from a deltafm compare "
                                                               "results.json")
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--out", type=Path, help="folder for REPORT.md (default: next to results.json, report/)")
    p.add_argument("--figures", type=Path, help="folder for the PNGs (default OUT/figures)")
    p.add_argument("--link-prefix", help="how the markdown links the figures (default 'figures')")
    p.add_argument("--update", type=Path, help="markdown file whose compare:NAME block is replaced")
    p.add_argument("--heading-level", type=int, default=3, help="#'s of the section headings in the --update block")
    p.add_argument("--copy-results", type=Path, help="also copy results.json to this path")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m deltafm.study.report``; 0 on success, 2 on bad input."""
    args = build_parser().parse_args(argv)
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
