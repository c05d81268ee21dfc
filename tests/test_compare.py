"""deltafm compare and its report: ratio computations on hand-made curves with known answers, the study
config, the Fig. 4 analogue on a closed-form model, report generation from a fake results.json, and
(slow) the whole pipeline on digits, including skip-when-done and exact resume of an interrupted arm."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from deltafm.eval.along_path import noised_accuracy, predicted_clean, trajectory_accuracy
from deltafm.solvers import nfe_to_steps
from deltafm.study.cli import main
from deltafm.study.plan import plan_units, resolve_train_config
from deltafm.study.ratios import first_reach, format_ratio, match_ratio, nfe_to_match, steps_to_match, summarize
from deltafm.study.report import build_report, update_section, write_report
from deltafm.study.spec import CompareError, load_compare_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "compare" / "digits-tiny.yaml"

# ----------------------------------------------------------------------------------------- ratios


def test_first_reach_interpolates_linearly_lower_and_higher_is_better():
    r = first_reach([1, 2, 3, 4], [10, 8, 6, 4], target=5.0)
    assert r.kind == "interpolated" and r.x == pytest.approx(3.5)
    r = first_reach([1, 2, 3, 4], [0.1, 0.5, 0.7, 0.9], target=0.6, lower_is_better=False)
    assert r.kind == "interpolated" and r.x == pytest.approx(2.5)
    # an exact hit counts as reached at that point
    assert first_reach([1, 2, 3], [9, 7, 5], target=7.0).x == pytest.approx(2.0)


def test_first_reach_uses_the_first_crossing_and_reports_bounds():
    # crosses at 1.5, goes back above the target, crosses again: the first crossing counts
    assert first_reach([1, 2, 3, 4], [6, 4, 6, 4], target=5.0).x == pytest.approx(1.5)
    at_first = first_reach([100, 200], [3.0, 2.0], target=5.0)
    assert (at_first.x, at_first.kind) == (100.0, "at_first")
    assert match_ratio(400, at_first) == (4.0, ">=")
    never = first_reach([100, 200, 300], [9.0, 8.0, 7.0], target=5.0)
    assert (never.x, never.kind) == (None, "never")
    assert match_ratio(300, never, x_last=300) == (1.0, "<")
    assert match_ratio(300, never) == (None, "<")
    with pytest.raises(ValueError):
        first_reach([2, 1], [1, 2], 1.5)


def test_first_reach_in_log_x():
    # between x=2 (30) and x=4 (20), target 25 is half way in log x: 2 * sqrt(2)
    r = first_reach([1, 2, 4, 8], [40, 30, 20, 10], target=25.0, log_x=True)
    assert r.x == pytest.approx(2 * math.sqrt(2))


def test_steps_to_match_known_answer():
    base = [(1, 10.0), (2, 8.0), (3, 6.0), (4, 5.0)]  # final value 5 at x = 4
    other = [(3, 4.5), (1, 9.0), (2, 5.5), (4, 4.0)]  # unsorted on purpose; crosses 5 at x = 2.5
    m = steps_to_match(base, other)
    assert m["target"] == 5.0 and m["x_ref"] == 4
    assert m["x"] == pytest.approx(2.5) and m["ratio"] == pytest.approx(1.6) and m["rel"] == "="
    # the baseline against itself needs exactly its own budget
    assert steps_to_match(base, base)["ratio"] == pytest.approx(1.0)
    # accuracy (higher is better): base reaches 0.8 at 4, other crosses 0.8 between 1 (0.6) and 2 (0.9)
    acc = steps_to_match([(1, 0.5), (4, 0.8)], [(1, 0.6), (2, 0.9), (4, 0.95)], lower_is_better=False)
    assert acc["x"] == pytest.approx(1 + 2 / 3) and acc["ratio"] == pytest.approx(4 / (5 / 3))


def test_match_against_a_plateaued_baseline_uses_its_own_first_crossing():
    # the baseline reaches its final value 10 already at NFE 2 (then stays flat within noise)
    base = [(1, 30.0), (2, 10.0), (4, 9.0), (8, 10.0)]
    other = [(1, 20.0), (2, 8.0), (4, 7.0), (8, 7.0)]
    m = nfe_to_match(base, other)
    assert m["x_ref"] == pytest.approx(2.0)
    assert m["x"] == pytest.approx(2 ** (10 / 12)) and m["ratio"] == pytest.approx(2 ** (1 - 10 / 12))
    assert nfe_to_match(base, base)["ratio"] == pytest.approx(1.0)
    flat = steps_to_match([(1, 5.0), (2, 5.0)], [(1, 6.0), (2, 4.0)])
    assert (flat["x_ref"], flat["ratio"], flat["rel"]) == (1.0, pytest.approx(1 / 1.5), "<=")


def test_nfe_to_match_known_answer():
    base = [(1, 50.0), (2, 40.0), (4, 30.0), (8, 20.0), (16, 15.0), (32, 12.0)]
    other = [(1, 45.0), (2, 30.0), (4, 18.0), (8, 11.0), (16, 10.0), (32, 9.0)]
    m = nfe_to_match(base, other)
    # crossing of 12 between NFE 4 (18) and 8 (11): log2 x = 2 + 6/7, ratio = 32 / x = 2^(15/7)
    assert m["x"] == pytest.approx(2 ** (2 + 6 / 7))
    assert m["ratio"] == pytest.approx(2 ** (15 / 7))


def test_summarize_and_format_ratio():
    s = summarize([1.0, 2.0, 3.0, None, float("nan")])
    assert s == {"mean": 2.0, "std": 1.0, "n": 3, "min": 1.0, "max": 3.0}
    assert summarize([])["n"] == 0
    per = [{"ratio": 1.5, "rel": "="}, {"ratio": 2.0, "rel": "="}, {"ratio": 4.0, "rel": ">="},
           {"ratio": 0.8, "rel": "<"}]
    assert format_ratio(per) == "1.75 ± 0.35 (2/4 interpolated; per seed: 1.50, 2.00, ≥4.00, <0.80)"


# ----------------------------------------------------------------------------------------- config


def test_tiny_config_units_and_train_configs():
    c = load_compare_config(TINY)
    arms = {a.name: a for a in c.arms}
    # fm: curve at 2 points + sweep (euler 1,2,4; heun 2,4; sde 2,4) + 1 cfg + along = 11; posthoc curve 2
    assert len(plan_units(c, arms["fm"])) == 13
    assert len(plan_units(c, arms["dfm"])) == 22
    assert sorted(plan_units(c, arms["dfm-diff"])) == ["curve/dfm-diff/1280", "curve/dfm-diff/640"]
    fm = resolve_train_config(c, arms["fm"], seed=3)
    dfm = resolve_train_config(c, arms["dfm"], seed=3, images=640)
    assert (fm.train.seed, fm.train.total_images, fm.train.steps) == (3, 1280, None)
    assert fm.train.ckpt_every == 10 and fm.train.keep_last >= 2 and fm.sample.every == -1
    assert (fm.objective.lam, dfm.objective.lam, dfm.train.total_images) == (0.0, 0.05, 640)
    from deltafm.train.config import diff_configs

    keys = [k for k, _, _ in diff_configs(fm, dfm)]
    assert keys == ["objective.lam", "train.total_images"]


def test_nfe_to_steps():
    assert [nfe_to_steps("euler", n) for n in (1, 2, 50)] == [1, 2, 50]
    assert [nfe_to_steps("heun", n) for n in (1, 2, 16, 50)] == [None, 1, 8, 25]
    assert [nfe_to_steps("sde", n) for n in (1, 2, 32)] == [None, 2, 32]
    assert nfe_to_steps("rk4", 8) == 2 and nfe_to_steps("rk4", 6) is None


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text.replace("BASE", str(ROOT / "configs" / "digits-tiny.yaml")))
    return p


def test_config_errors(tmp_path):
    ok = "name: x\nbase: BASE\ntotal_images: 1280\neval_every_images: 640\narms:\n  - name: fm\n"
    load_compare_config(_write(tmp_path, ok))
    with pytest.raises(CompareError, match="unknown key"):
        load_compare_config(_write(tmp_path, ok + "    overides: {objective.lam: 0}\n"))
    with pytest.raises(CompareError, match="multiple"):
        load_compare_config(_write(tmp_path, ok.replace("1280", "1000")))
    with pytest.raises(CompareError, match="baseline"):
        load_compare_config(_write(tmp_path, ok + "baseline: dfm\n"))
    with pytest.raises(CompareError, match="to_delta needs"):
        load_compare_config(_write(tmp_path, ok + "    variants: [{name: a, map: to_delta}]\n"))
    c = load_compare_config(_write(tmp_path, ok.replace("640", "32").replace("1280", "64")))
    with pytest.raises(CompareError, match="multiple of its batch size"):
        resolve_train_config(c, c.arms[0], 0)


def test_dry_run_prints_the_plan(capsys):
    assert main(["--config", str(TINY), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "arm dfm-diff: seeds [0]; batch 64, 20 steps" in out and "objective.negatives='different_class'" in out
    assert main(["--config", str(TINY) + ".missing", "--dry-run"]) == 2


# ----------------------------------------------------------------------------------------- along the path


class _TemplateModel(nn.Module):
    """Exact linear-path velocity towards a class template: v = (T[c] − x) / (1 − t), so x̂1 = T[c]."""

    def __init__(self, templates: torch.Tensor) -> None:
        super().__init__()
        self.templates = torch.cat([templates, templates.mean(0, keepdim=True)])  # null class: the mean

    def forward(self, x, t, cond):
        return (self.templates[cond] - x) / (1 - t).clamp_min(1e-6).view(-1, 1, 1, 1)


class _NearestTemplate(nn.Module):
    def __init__(self, templates: torch.Tensor) -> None:
        super().__init__()
        self.templates = templates

    def forward(self, x):
        return -((x[:, None] - self.templates[None]) ** 2).flatten(2).sum(-1)


def test_predicted_clean_linear_path():
    x_t, v, t = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3), torch.rand(4)
    torch.testing.assert_close(predicted_clean(v, x_t, t), x_t + (1 - t).view(-1, 1, 1, 1) * v)


def test_along_path_accuracy_on_a_closed_form_model():
    templates = torch.tensor([-0.5, 0.0, 0.5]).view(3, 1, 1, 1).expand(3, 1, 4, 4).contiguous()
    model, clf = _TemplateModel(templates), _NearestTemplate(templates)
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 0])
    x1 = templates[labels] + 0.3 * torch.randn(7, 1, 4, 4)
    kw = dict(num_classes=3, seed=1, batch_size=3)
    assert noised_accuracy(model, clf, x1, labels, [0.0, 0.5, 0.9], **kw) == [1.0, 1.0, 1.0]
    # the null class predicts the mean template (= class 1's), so exactly the class-1 items are right
    null = noised_accuracy(model, clf, x1, labels, [0.0, 0.5], null_label=True, **kw)
    assert null == pytest.approx([2 / 7, 2 / 7])
    times, acc = trajectory_accuracy(model, clf, labels, (1, 4, 4), steps=4, **kw)
    assert times == [0.0, 0.25, 0.5, 0.75, 1.0] and acc == [1.0] * 5


# ----------------------------------------------------------------------------------------- report


def _fake_results() -> dict:
    ev = {"curve": {"solver": "heun", "nfe": 8, "num": 10}, "sweep": {"solvers": ["euler"], "nfe": [1, 2, 4],
          "num": 10}, "cfg": {"scales": [2.0], "solver": "heun", "nfe": 8, "num": 10}, "amp": "none",
          "sample_seed": 0, "pr_k": 3}
    arms = [{"name": "fm", "seeds": [0, 1], "baseline": "fm", "lam": 0.0, "negatives": "uniform", "batch_size": 8,
             "variants": [{"name": "fm", "map": "none", "lam": None}]},
            {"name": "dfm", "seeds": [0, 1], "baseline": "fm", "lam": 0.05, "negatives": "uniform", "batch_size": 8,
             "variants": [{"name": "dfm", "map": "none", "lam": None}]}]
    study = {"name": "fake", "base": "b.yaml", "source": "c.yaml", "overrides": {}, "total_images": 300,
             "eval_every_images": 100, "seeds": [0, 1], "baseline": "fm", "main_variants": None, "eval": ev,
             "arms": arms, "description": ""}

    def curve(fds):
        return [{"images": 100 * (i + 1), "step": i, "fd": fd, "class_acc": 0.5 + 0.1 * i, "precision": 0.5,
                 "recall": 0.5, "is": 2.0} for i, fd in enumerate(fds)]

    def sweep(fds):
        return [{"solver": "euler", "nfe": n, "fd": fd, "class_acc": 0.5} for n, fd in zip([1, 2, 4], fds)]

    def along(acc):
        return {v: {"t": [0.0, 0.5], "acc": acc} for v in ("trajectory", "noised_class", "noised_null")}

    curves = {("fm", 0): [40, 20, 10], ("dfm", 0): [30, 10, 8], ("fm", 1): [40, 25, 12], ("dfm", 1): [16, 8, 6]}
    sweeps = {("fm", 0): [30, 20, 10], ("dfm", 0): [30, 10, 5], ("fm", 1): [30, 20, 10], ("dfm", 1): [30, 10, 5]}
    runs = []
    for (arm, seed), fds in curves.items():
        runs.append({"arm": arm, "seed": seed, "status": "done", "train": {"seconds": 60.0},
                     "variants": {arm: {"curve": curve(fds), "sweep": sweep(sweeps[(arm, seed)]),
                                        "cfg": [{"w": 2.0, "fd": 9.0, "class_acc": 0.9}],
                                        "along": along([0.1, 0.9] if arm == "fm" else [0.2, 1.0])}}})
    return {"format": "deltafm.compare.v1", "study": study, "classifier": None, "runs": runs}


def test_report_from_fake_results(tmp_path):
    data = _fake_results()
    md = build_report(data, tmp_path / "fig", "figs")
    # steps-to-match: seed 0 reaches FM's final 10 exactly at 200 (ratio 1.5); seed 1 crosses 12 at 150 (2.0)
    assert "1.75 ± 0.35 (2/2 interpolated; per seed: 1.50, 2.00)" in md
    # NFE-to-match (euler): FM's value at NFE 4 is 10, reached by ΔFM at NFE 2 in both seeds -> 2.00
    assert "2.00 ± 0.00 (2/2 interpolated; per seed: 2.00, 2.00)" in md
    # final FD: fm (10, 12) -> 11 ± 1.41; dfm (8, 6) -> 7 ± 1.41; paired ΔFD = (-2, -6) -> -4 ± 2.83
    assert "| fm | λ=0, batch 8 | 2 | 11.0 ± 1.41 |" in md
    assert "| dfm | fm | 2 | -4.00 ± 2.83 | 2/2 |" in md
    assert "![metric vs images](figs/fake-curves.png)" in md
    for name in ("fake-curves.png", "fake-nfe.png", "fake-along.png", "fake-cfg.png"):
        assert (tmp_path / "fig" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = tmp_path / "results.json"
    res.write_text(json.dumps(data))
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# R\n\nkeep me\n\n<!-- BEGIN compare:fake -->\nold\n<!-- END compare:fake -->\n\ntail\n")
    path = write_report(res, tmp_path / "rep", update=doc)
    assert path.read_text().startswith("## FM vs ΔFM: fake")
    text = doc.read_text()
    assert text.startswith("# R\n\nkeep me\n\n<!-- BEGIN compare:fake -->")
    assert text.endswith("<!-- END compare:fake -->\n\ntail\n")
    assert "old" not in text and "1.75 ± 0.35" in text
    with pytest.raises(ValueError, match="no block"):
        update_section(tmp_path / "rep" / "REPORT.md", "fake", "x")


# ----------------------------------------------------------------------------------------- end to end


def _units(out: Path, arm: str) -> dict:
    return json.loads((out / "results" / arm / "seed0.json").read_text())["units"]


@pytest.mark.slow
def test_compare_end_to_end_skip_and_exact_resume(tmp_path):
    out = tmp_path / "cmp"
    # --train-only: checkpoints at both evaluation points, no units, no classifier
    assert main(["--config", str(TINY), "--out", str(out), "--quiet", "--train-only", "--arms", "dfm-diff"]) == 0
    ckpts = out / "runs" / "dfm-diff" / "seed0" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000010", "step_00000020"]
    assert _units(out, "dfm-diff") == {} and not (out / "classifier").exists()

    assert main(["--config", str(TINY), "--out", str(out), "--quiet"]) == 0
    # dfm-diff was evaluated from its kept checkpoints, without training again
    events = [json.loads(x) for x in (out / "runs" / "dfm-diff" / "seed0" / "log.jsonl").read_text().splitlines()]
    assert [e["message"] for e in events if e["kind"] == "event" and e["message"] in ("start", "resume")] == ["start"]
    res = json.loads((out / "results.json").read_text())
    assert {(r["arm"], r["status"]) for r in res["runs"]} == {("fm", "done"), ("dfm", "done"), ("dfm-diff", "done")}
    assert (len(_units(out, "fm")), len(_units(out, "dfm")), len(_units(out, "dfm-diff"))) == (13, 22, 2)
    fm = next(r for r in res["runs"] if r["arm"] == "fm")["variants"]["fm"]
    assert [p["images"] for p in fm["curve"]] == [640, 1280]
    assert {(p["solver"], p["nfe"]) for p in fm["sweep"]} == {("euler", 1), ("euler", 2), ("euler", 4), ("heun", 2),
                                                              ("heun", 4), ("sde", 2), ("sde", 4)}
    assert len(fm["along"]["trajectory"]["acc"]) == 5 and 0 <= fm["curve"][-1]["class_acc"] <= 1
    assert (out / "report" / "REPORT.md").is_file() and (out / "samples" / "dfm+bc" / "seed0.png").is_file()
    before = _units(out, "dfm")

    # everything done: a second run trains and samples nothing
    assert main(["--config", str(TINY), "--out", str(out), "--quiet", "--no-report"]) == 0
    assert "skip dfm seed 0: all 22 units done" in (out / "compare.log").read_text()

    # an interrupted arm: its last checkpoint and results gone -> it resumes from step 10 and reproduces them
    (out / "results" / "dfm" / "seed0.json").unlink()
    shutil.rmtree(out / "runs" / "dfm" / "seed0" / "checkpoints" / "step_00000020")
    assert main(["--config", str(TINY), "--out", str(out), "--quiet", "--no-report", "--arms", "dfm"]) == 0
    log = (out / "runs" / "dfm" / "seed0" / "log.jsonl").read_text()
    assert '"resume"' in log
    after = _units(out, "dfm")
    strip = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
    assert {k: strip(v["metrics"]) for k, v in after.items()} == {k: strip(v["metrics"]) for k, v in before.items()}


def test_paired_comparisons_with_t_intervals(tmp_path):
    from deltafm.study.paired import t_interval

    # n = 3: mean 1, sd 1, t_{0.975, 2} = 4.302652729911275 -> half-width 4.3027 / sqrt(3)
    mean, lo, hi = t_interval([0.0, 1.0, 2.0])
    assert mean == pytest.approx(1.0) and hi - mean == pytest.approx(4.302652729911275 / 3**0.5)
    assert t_interval([1.0]) is None
    data = _fake_results()
    data["study"]["comparisons"] = [["dfm", "fm"]]
    md = build_report(data, tmp_path / "fig", "figs")
    # paired ΔFD = (-2, -6): mean -4, sd 2.83, t_{0.975, 1} = 12.706 -> ±25.4; cfg differences are all 0
    assert "Paired comparisons (fake" in md
    assert "| dfm | fm | 2 | -4.00 [-29.4, 21.4] | 2/2 |" in md
    assert "| 0 [0, 0] | 0 [0, 0] |" in md


def test_comparisons_must_name_two_variants(tmp_path):
    from deltafm.study.spec import CompareError, load_compare_config

    src = (ROOT / "configs" / "compare" / "digits-tiny.yaml").read_text()
    for bad in ("[[dfm, nothing]]", "[[dfm, dfm]]", "[[dfm]]"):
        p = tmp_path / "c.yaml"
        p.write_text(src.replace("base: ../digits-tiny.yaml", f"base: {ROOT / 'configs' / 'digits-tiny.yaml'}")
                     + f"\ncomparisons: {bad}\n")
        with pytest.raises(CompareError, match="comparisons"):
            load_compare_config(p)


def test_every_shipped_study_config_parses_and_plans():
    """configs/compare/*.yaml: valid studies whose arms plan their units; the issue-13 studies sample every unit
    with two noise seeds, score KID and state an FD equivalence margin."""
    from deltafm.study.spec import load_compare_config

    for path in sorted((ROOT / "configs" / "compare").glob("*.yaml")):
        c = load_compare_config(path)
        for arm in c.arms:
            assert plan_units(c, arm), (path.name, arm.name)
        if path.stem.startswith("fmnist-unet-") and path.stem != "fmnist-unet":
            assert len(c.eval.sample_seeds or []) >= 2 and c.eval.kid_subsets >= 100, path.name
            assert c.equivalence == {"fd": 0.25} and c.eval.classifier == "weights/fmnist-classifier.safetensors"
    power = load_compare_config(ROOT / "configs" / "compare" / "fmnist-unet-power.yaml")
    assert len(power.seeds) >= 8 and power.eval.curve.num >= 2000


def test_paired_differences_against_images_and_the_lambda_section(tmp_path):
    from deltafm.study.report_paired import lambda_series, paired_curve
    from deltafm.study.results import Results

    data = _fake_results()
    r = Results(data)
    # fm curves (40, 20, 10) and (40, 25, 12); dfm (30, 10, 8) and (16, 8, 6): per-seed differences at 100
    # images (-10, -24), at 300 (-2, -6): means -17 and -4, t_{0.975, 1} = 12.706 -> -4 ± 12.706 * 2.828 / √2
    pts = paired_curve(r, "dfm", "fm", "fd")
    assert [p[0] for p in pts] == [100, 200, 300] and pts[0][1] == pytest.approx(-17.0)
    assert pts[2][1] == pytest.approx(-4.0) and pts[2][3] - pts[2][1] == pytest.approx(12.7062047 * 2.0, rel=1e-6)
    assert "Paired ΔFD against images seen" not in build_report(data, tmp_path / "a", "figs")  # no comparisons
    data["study"]["comparisons"] = [["dfm", "fm"]]
    md = build_report(data, tmp_path / "b", "figs")
    assert "| variant − baseline | 100 | 200 | 300 |" in md and "| dfm − fm | -17.0 [" in md
    assert (tmp_path / "b" / "fake-paired-curves.png").is_file()
    # a second ΔFM arm at λ = 0.1 (raw variant only) turns on the λ section; FM's own post-hoc map at 0.05
    assert "FD against λ" not in md and lambda_series(r)["ΔFM"] == {0.05: [8, 6]}
    arm = {**data["study"]["arms"][1], "name": "dfm-0.1", "lam": 0.1,
           "variants": [{"name": "dfm-0.1", "map": "none", "lam": None}]}
    data["study"]["arms"].append(arm)
    one = data["runs"][1]  # dfm, seed 0
    data["runs"].append({**one, "arm": "dfm-0.1", "variants": {"dfm-0.1": one["variants"]["dfm"]}})
    md = build_report(data, tmp_path / "c", "figs")
    assert "FD against λ with its controls (fake" in md and "| ΔFM | 7.00 [" in md and "| 8.00 (n=1) |" in md
    assert "paired ΔFD against λ" not in md  # λ = 0.1 has one seed: no paired table yet
    # its second seed, and FM mapped post hoc to λ = 0.05 (finals 9 and 9), turn on the paired table
    two = data["runs"][3]  # dfm, seed 1
    data["runs"].append({**two, "arm": "dfm-0.1", "variants": {"dfm-0.1": two["variants"]["dfm"]}})
    data["study"]["arms"][0]["variants"].append({"name": "fm+ph", "map": "to_delta", "lam": 0.05})
    for run in data["runs"][:3:2]:  # fm seeds 0 and 1
        ph = json.loads(json.dumps(run["variants"]["fm"]))
        ph["curve"][-1]["fd"] = 9.0
        run["variants"]["fm+ph"] = ph
    from deltafm.study.report_paired import lambda_paired

    paired = lambda_paired(Results(data), "fm")
    # dfm finals (8, 6), dfm-0.1 (8, 6), fm (10, 12), fm+ph (9, 9)
    assert paired == {"ΔFM − FM": {0.05: [-2, -6], 0.1: [-2, -6]}, "FM + post-hoc − FM": {0.05: [-1, -3]},
                      "ΔFM − FM + post-hoc": {0.05: [-1, -3]}, "ΔFM + bc − FM": {}}
    md = build_report(data, tmp_path / "d", "figs")
    assert "| variant − baseline | λ=0.05 | λ=0.1 |" in md and "| ΔFM − FM + post-hoc | -2.00 [" in md
    assert "| ΔFM − FM | -4.00 [-29.4, 21.4] (n=2) | -4.00 [-29.4, 21.4] (n=2) |" in md  # -4 ± 12.706·2.828/√2
    assert "![paired ΔFD against λ](figs/fake-lambda-paired.png)" in md
    assert (tmp_path / "d" / "fake-lambda-paired.png").is_file()


def test_the_gpu_studies_script_names_shipped_studies():
    """scripts/gpu_studies.sh (run on a CUDA machine; its CPU smoke mode is the digits smoke study) parses as bash
    and runs only studies that exist."""
    import re
    import subprocess

    script = ROOT / "scripts" / "gpu_studies.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    studies = re.search(r'STUDIES=\$\{STUDIES:-"([^"]+)"\}', script.read_text()).group(1).split()
    assert studies[0] == "fmnist-unet-power"
    for s in [*studies, "digits-tiny"]:
        assert (ROOT / "configs" / "compare" / f"{s}.yaml").is_file(), s
