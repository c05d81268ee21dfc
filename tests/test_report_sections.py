"""Study report sections on hand-made results: the sampling-error table (deltafm.study.report_noise) and the
per-sampler paired comparisons (deltafm.study.paired), against closed forms."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from deltafm.study.paired import section_comparisons
from deltafm.study.report_context import ReportContext
from deltafm.study.report_noise import noise_split, section_sampling_error
from deltafm.study.results import Results

TOTAL = 1000


def _point(draws: list[float], kid: list[float] | None = None) -> dict:
    p = {"images": TOTAL, "fd": float(np.mean(draws)), "class_acc": 0.5, "per_seed": {"fd": draws}}
    if kid is not None:
        p["kid"] = float(np.mean(kid))
        p["per_seed"]["kid"] = kid
    return p


def _results(fm: dict[int, list[float]], dfm: dict[int, list[float]]) -> dict:
    arms = [{"name": "fm", "lam": 0.0, "baseline": "fm", "variants": [{"name": "fm", "map": "none"}]},
            {"name": "dfm", "lam": 0.05, "baseline": "fm", "variants": [{"name": "dfm", "map": "none"}]}]
    runs = [{"arm": arm, "seed": s, "variants": {arm: {"curve": [_point(d)], "sweep": [], "cfg": [], "along": None}}}
            for arm, per in (("fm", fm), ("dfm", dfm)) for s, d in per.items()]
    study = {"name": "noisy", "arms": arms, "total_images": TOTAL, "eval": {"curve": {"num": 10}},
             "comparisons": [["dfm", "fm"]], "main_variants": ["fm", "dfm"]}
    return {"study": study, "runs": runs}


def _section(data: dict, tmp_path: Path) -> str:
    return "\n".join(section_sampling_error(ReportContext(Results(data), "###", tmp_path, lambda f: f, None)))


def test_noise_split_closed_form():
    # two seeds, two draws each: means 1 and 3; within-seed variances 0.5 and 2 -> pooled 1.25
    s = noise_split([[0.5, 1.5], [2.0, 4.0]])
    assert (s["n"], s["k"], s["mean"]) == (2, 2, 2.0)
    assert s["sd_seeds"] == pytest.approx(math.sqrt(2.0))        # var of (1, 3) is 2
    assert s["sd_noise"] == pytest.approx(math.sqrt(1.25))
    assert s["noise_share"] == pytest.approx((1.25 / 2) / 2.0)
    one = noise_split([[1.0, 2.0, 3.0]])
    assert one["sd_seeds"] is None and one["noise_share"] is None and one["sd_noise"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same number"):
        noise_split([[1.0, 2.0], [1.0]])
    with pytest.raises(ValueError, match=">= 2"):
        noise_split([[1.0], [2.0]])


def test_noise_split_agrees_with_a_variance_components_fit():
    """The pooled within-seed variance is the one-way ANOVA mean square within, and var of the means
    minus it over k estimates the training-seed component (numpy as the independent implementation)."""
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 1.0, size=(6, 1)) + rng.normal(0.0, 0.3, size=(6, 4))
    s = noise_split(x.tolist())
    ms_within = ((x - x.mean(axis=1, keepdims=True)) ** 2).sum() / (6 * 3)
    assert s["sd_noise"] ** 2 == pytest.approx(ms_within)
    assert s["sd_seeds"] ** 2 == pytest.approx(x.mean(axis=1).var(ddof=1))
    assert s["noise_share"] == pytest.approx(ms_within / 4 / x.mean(axis=1).var(ddof=1))


def test_section_pairs_the_draws_and_shared_noise_cancels(tmp_path: Path):
    # dfm = fm − 1 on every draw plus a training-seed offset: the paired noise sd is exactly 0
    fm = {0: [10.0, 12.0], 1: [11.0, 11.0], 2: [9.0, 10.0]}
    dfm = {s: [x - 1.0 + 0.1 * s for x in d] for s, d in fm.items()}
    md = _section(_results(fm, dfm), tmp_path)
    assert "Sampling error of the final point (noisy, 10 samples per noise seed)" in md
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in md.splitlines()
            if line.startswith("| FD of") or line.startswith("| ΔFD")}
    fm_row, d_row = rows["FD of fm"], rows["ΔFD dfm − fm"]
    s = noise_split(list(fm.values()))
    assert fm_row[1:4] == ["3", "2", "10.5"] and float(fm_row[5]) == pytest.approx(s["sd_noise"], abs=5e-3)
    assert d_row[3] == "-0.9" or float(d_row[3]) == pytest.approx(-0.9)
    assert d_row[5] == "0" and d_row[7].strip(" |") == "0"      # paired noise sd and share


def test_section_absent_without_noise_seeds(tmp_path: Path):
    data = _results({0: [1.0, 2.0]}, {0: [1.0, 2.0]})
    for run in data["runs"]:
        for v in run["variants"].values():
            v["curve"][0].pop("per_seed")
    assert _section(data, tmp_path) == ""


def test_comparisons_per_sampler_at_the_largest_nfe(tmp_path: Path):
    """ΔFD per sweep sampler at its largest NFE: the paired mean and t-interval of hand-made values, and the
    TOST verdict at the study's margin (scipy's t quantile as the independent check)."""
    from scipy.stats import t as student_t

    data = _results({0: [1.0, 1.0], 1: [1.0, 1.0], 2: [1.0, 1.0]}, {0: [1.0, 1.0], 1: [1.0, 1.0], 2: [1.0, 1.0]})
    diffs = {"heun": [-0.1, 0.0, 0.1], "sde": [-2.0, -1.0, -3.0]}
    for run in data["runs"]:
        s, arm = run["seed"], run["arm"]
        sweep = []
        for solver, d in diffs.items():
            for nfe in (4, 16):  # only NFE 16 (the largest) is reported
                fd = 5.0 + (d[s] if arm == "dfm" and nfe == 16 else 0.0) + (9.0 if nfe == 4 else 0.0)
                sweep.append({"solver": solver, "nfe": nfe, "fd": fd})
        run["variants"][arm]["sweep"] = sweep
    data["study"]["eval"]["sweep"] = {"solvers": ["heun", "sde"], "nfe": [4, 16], "num": 10}
    data["study"]["equivalence"] = {"fd": 0.5}
    md = "\n".join(section_comparisons(ReportContext(Results(data), "###", tmp_path, lambda f: f, None)))
    head = next(line for line in md.splitlines() if line.startswith("| variant | baseline | ΔFD heun"))
    assert head == ("| variant | baseline | ΔFD heun NFE 16 | fd within ±0.5 (heun) | ΔFD sde NFE 16 | "
                    "fd within ±0.5 (sde) |")
    row = md.splitlines()[md.splitlines().index(head) + 2]
    half95 = float(student_t.ppf(0.975, 2)) * 0.1 / math.sqrt(3)      # the sd of (-0.1, 0, 0.1) is 0.1
    half90 = float(student_t.ppf(0.95, 2)) * 0.1 / math.sqrt(3)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:2] == ["dfm", "fm"]
    assert cells[2] == f"0 [{-half95:.3g}, {half95:.3g}]"
    assert cells[3] == f"yes [{-half90:.3g}, {half90:.3g}]"       # inside ±0.5
    assert cells[4].startswith("-2.00 [") and cells[5].startswith("not shown")
    # the forest plot of the final pairs is written and linked
    assert "![paired differences at the end of training](noisy-paired-final.png)" in md
    assert (tmp_path / "noisy-paired-final.png").read_bytes()[:4] == b"\x89PNG"


def test_forest_plot_needs_differences(tmp_path: Path):
    from deltafm.study.figures import plot_paired_final

    assert plot_paired_final([("a − b", [], None)], tmp_path / "f.png", "t", "x", 0.25) is None
    assert not (tmp_path / "f.png").exists()
    assert plot_paired_final([("a − b", [0.1], None), ("c − d", [0.1, -0.2], (-2.0, 1.9))], tmp_path / "f.png",
                             "t", "x", 0.25) == tmp_path / "f.png"


def test_one_point_studies_have_no_steps_to_match(tmp_path: Path):
    """A study evaluated only at the end of training gets no metric-vs-images section (one point is no curve)
    and no steps-to-match in the seed-0 table; with a second point the section comes back."""
    from deltafm.study.report import _section_curves, _section_one_seed

    data = _results({0: [7.0, 7.2]}, {0: [6.0, 6.2]})
    data["study"]["seeds"] = [0]
    ctx = ReportContext(Results(data), "###", tmp_path, lambda f: f, None)
    assert _section_curves(ctx) == []
    row = next(line for line in _section_one_seed(ctx) if line.startswith("| dfm |"))
    assert row.rstrip(" |").endswith("| -1.00 | –")
    for run in data["runs"]:
        v = next(iter(run["variants"].values()))
        v["curve"].insert(0, {**v["curve"][0], "images": TOTAL // 2, "fd": 9.0})
    ctx = ReportContext(Results(data), "###", tmp_path, lambda f: f, None)
    assert any("Steps-to-match" in line for line in _section_curves(ctx))


def test_one_nfe_sweeps_have_no_nfe_to_match(tmp_path: Path):
    from deltafm.study.report import _section_nfe

    data = _results({0: [7.0, 7.2]}, {0: [6.0, 6.2]})
    data["study"]["eval"]["sweep"] = {"solvers": ["heun"], "nfe": [16], "num": 10}
    for run in data["runs"]:
        next(iter(run["variants"].values()))["sweep"] = [{"solver": "heun", "nfe": 16, "fd": 9.0, "class_acc": 0.5}]
    ctx = ReportContext(Results(data), "###", tmp_path, lambda f: f, None)
    md = "\n".join(_section_nfe(ctx))
    assert "| NFE 16 |" in md and "NFE-to-match" not in md
    for run in data["runs"]:
        next(iter(run["variants"].values()))["sweep"].insert(0, {"solver": "heun", "nfe": 8, "fd": 12.0,
                                                                 "class_acc": 0.4})
    assert "NFE-to-match" in "\n".join(_section_nfe(ReportContext(Results(data), "###", tmp_path, lambda f: f, None)))
