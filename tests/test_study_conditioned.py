"""deltafm compare for text-to-image and multi-condition arms on the shapes sets, scored by the attribute reader
(``eval.scorer: attributes``): a tiny text study and a tiny multi study end to end (results, report, resume),
the prompts a unit asks for, the scores of real images, the shipped study configs, and bad specs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from deltafm.data import load_dataset
from deltafm.data.shapes import ShapesConfig
from deltafm.eval.attributes import save_reader
from deltafm.eval.attributes_train import ReaderRecipe, train_reader
from deltafm.study.attributes import AttributeEvaluator, Prompts
from deltafm.study.cli import main as compare_main
from deltafm.study.plan import check_scoring, plan_units
from deltafm.study.spec import CompareError, load_compare_config, parse_compare_config
from deltafm.train.checkpoint import list_checkpoints
from deltafm.train.restore import load_for_sampling
from tiny_text import tiny_bert

ROOT = Path(__file__).resolve().parents[1]
FAST = {"train.batch_size": 16, "train.threads": 1, "data.image_size": 16, "data.max_items": 64,
        "train.precision": "fp32", "optim.warmup_images": 16, "log.every": 1, "train.ema_halflife_images": 100,
        "sample.every": -1}
MULTI = {"data.name": "shapes", "model.name": "SiT-N/4", "conditioning.kind": "multi",
         "conditioning.text_encoder": None, "conditioning.parts": ["shape", "colour", "cell"],
         "conditioning.contrast_on": "shape", "objective.negatives": "different_class"}
ARMS = [{"name": "fm", "overrides": {"objective.lam": 0.0}, "stages": ["curve", "cfg"],
         "variants": ["fm", {"name": "fm+posthoc", "map": "to_delta", "lam": 0.05}]},
        {"name": "dfm", "overrides": {"objective.lam": 0.05}, "stages": ["curve", "cfg"],
         "variants": ["dfm", {"name": "dfm+bc", "map": "to_fm"}]}]


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def reader(tmp_path_factory) -> Path:
    """An attribute reader for 16 x 16 scenes, trained for about a second (reads colour, size, cell well)."""
    torch.set_num_threads(1)
    r = train_reader(ReaderRecipe(scenes=2048, epochs=1, batch_size=32, widths=(16, 24, 32), seed=0),
                     ShapesConfig(canvas=16), progress=False, evaluate=0)
    path = tmp_path_factory.mktemp("reader") / "reader.safetensors"
    save_reader(r, path)
    return path


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised BERT with a word-level tokenizer over the shapes captions' words."""
    pytest.importorskip("transformers")
    return tiny_bert(tmp_path_factory.mktemp("text") / "tiny-bert")


def _study(name: str, reader: Path, overrides: dict, **eval_spec) -> dict:
    """Two arms (FM with its post-hoc map, ΔFM with its bias correction), 2 steps of batch 16, curve at 16 and
    32 images, 8 samples per unit, FD against the first 16 images of each split."""
    ev = {"scorer": "attributes", "reader": str(reader), "reference_max": 16, "batch_size": 8,
          "curve": {"solver": "euler", "nfe": 2, "num": 8}, "cfg": {"scales": [2.0], "solver": "euler", "nfe": 2,
                                                                    "num": 8}}
    for k, v in eval_spec.items():
        ev[k] = {**ev[k], **v} if isinstance(v, dict) and isinstance(ev.get(k), dict) else v
    return {"name": name, "base": "shapes-t2i-mmdit-deltafm", "overrides": {**FAST, **overrides}, "seeds": [0],
            "total_images": 32, "eval_every_images": 16, "arms": ARMS, "eval": ev}


def _text(reader: Path, text_dir: Path, **eval_spec) -> dict:
    study = _study("t2i-tiny", reader, {"conditioning.text_encoder": str(text_dir)},
                   **{"prompt_splits": ["test", "heldout"], **eval_spec})
    return {**study, "comparisons": [["dfm", "fm+posthoc"], ["dfm+bc", "fm"]]}


def _multi(reader: Path, **eval_spec) -> dict:
    return _study("multi-tiny", reader, MULTI, **{"prompt_splits": "heldout", **eval_spec})


def _run(tmp_path: Path, study: dict, *args: str) -> tuple[int, Path]:
    cfg, out = tmp_path / f"{study['name']}.yaml", tmp_path / "out"
    cfg.write_text(yaml.safe_dump(study))
    return compare_main(["--config", str(cfg), "--out", str(out), "--quiet", *args]), out


def _evaluator(study: dict, out: Path, arm: str = "dfm"):
    c = parse_compare_config(study)
    lm = load_for_sampling(list_checkpoints(out / "runs" / arm / "seed0" / "checkpoints")[-1])
    return AttributeEvaluator(c, out, "cpu", lambda _: None), lm


# ----------------------------------------------------------------------------------------- text to image


def test_text_study_end_to_end_report_and_resume(tmp_path, reader, text_dir):
    study = _text(reader, text_dir)
    rc, out = _run(tmp_path, study, "--no-report")
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert {(r["arm"], r["status"]) for r in res["runs"]} == {("fm", "done"), ("dfm", "done")}
    assert res["study"]["eval"]["scorer"] == "attributes" and res["study"]["arms"][0]["conditioning"] == "text"
    assert res["classifier"]["scorer"] == "attributes" and res["classifier"]["id"].startswith("attributes:")
    assert {s: m["count"] for s, m in res["classifier"]["reference"].items()} == {"test": 16, "heldout": 16}
    dfm = next(r for r in res["runs"] if r["arm"] == "dfm")["variants"]
    rows = dfm["dfm+bc"]["curve"]
    assert sorted((p["images"], p["split"]) for p in rows) == [(16, "heldout"), (16, "test"), (32, "heldout"),
                                                               (32, "test")]
    keys = {"fd", "prompt_acc", "agreement", *(f"acc.{k}" for k in ("shape", "colour", "size", "cell", "count",
                                                                     "relation"))}
    for p in rows + dfm["dfm"]["cfg"]:
        assert keys <= set(p) and np.isfinite(p["fd"]) and p["fd"] > 0
        assert all(p[k] is None or 0 <= p[k] <= 1 for k in keys - {"fd"})
        assert p["prompt_acc"] <= p["agreement"]  # a prompt counts only when all of its claims hold
    assert [(p["w"], p["split"]) for p in dfm["dfm"]["cfg"]] == [(2.0, "heldout"), (2.0, "test")]
    units = json.loads((out / "results" / "fm" / "seed0.json").read_text())["units"]
    assert len(units) == 12 and units["curve/fm/32/heldout"]["settings"]["ref_items"] == 16
    # the bias correction and the post-hoc map change the samples
    fm = next(r for r in res["runs"] if r["arm"] == "fm")["variants"]
    assert fm["fm"]["curve"][-1]["fd"] != fm["fm+posthoc"]["curve"][-1]["fd"]

    # everything done: nothing is trained or sampled again; then the report
    before = (out / "results" / "dfm" / "seed0.json").read_text()
    assert _run(tmp_path, study)[0] == 0
    assert "skip dfm seed 0: all 12 units done" in (out / "compare.log").read_text()
    assert (out / "results" / "dfm" / "seed0.json").read_text() == before
    md = (out / "report" / "REPORT.md").read_text()
    for split in ("test", "heldout"):
        assert f"### Final quality (t2i-tiny, {split} prompts, euler NFE 2, 8 samples" in md
        assert f"### Paired comparisons (t2i-tiny, {split} prompts" in md
        assert (out / "report" / "figures" / f"t2i-tiny-{split}-curves.png").is_file()
        assert (out / "samples" / "dfm" / split / "seed0.png").is_file()
    assert "| reader-FD ↓ | prompt accuracy ↑ | agreement ↑ | shape accuracy ↑ |" in md
    assert "| dfm | fm+posthoc | 1 |" in md and "Δ prompt acc [95% CI]" in md
    # per-attribute differences of each pair, unguided and at w = 2 (one seed: the difference itself)
    fm_row = next(p for p in fm["fm+posthoc"]["curve"] if p["images"] == 32 and p["split"] == "heldout")
    dfm_row = next(p for p in dfm["dfm"]["curve"] if p["images"] == 32 and p["split"] == "heldout")
    assert "Per-attribute accuracy, variant − baseline (t2i-tiny, heldout prompts" in md
    assert "| variant | baseline | guidance w | Δ shape accuracy | Δ colour accuracy |" in md
    from deltafm.study.markdown import fmt

    want = fmt(dfm_row["acc.colour"] - fm_row["acc.colour"])
    heldout = md[md.index("Per-attribute accuracy, variant − baseline (t2i-tiny, heldout"):]
    row = next(line for line in heldout.splitlines() if line.startswith("| dfm | fm+posthoc | none |"))
    assert row.split(" | ")[4] == want
    assert "| dfm | fm+posthoc | 2 |" in heldout
    assert "sample i conditioned on the caption of item i of each prompt split: test, heldout" in md


def test_text_prompts_are_the_split_captions_and_real_images_score_well(tmp_path, reader, text_dir):
    study = _text(reader, text_dir, curve={"num": 4}, cfg={"num": 4}, prompt_splits=["heldout"])
    study.update(arms=[{**ARMS[1], "stages": ["curve"]}], baseline="dfm", comparisons=[])
    assert _run(tmp_path, study, "--no-report")[0] == 0
    ev, lm = _evaluator(study, tmp_path / "out")
    heldout = load_dataset("shapes-scenes", split="heldout", max_items=16, image_size=16)
    p = ev.prompts(lm, "heldout", 16)
    assert p.captions == [heldout.captions[int(i)] for i in heldout.caption_ids]
    assert len(p.labels) == 16 and p.labels.table.tokens.shape[0] == len(set(p.captions))
    # the real images against their own captions: FD ~0 (they are the reference set), far more claims hold
    # than against the captions of other images
    real = heldout.images.numpy()
    own = ev.score(real, "heldout", p)
    other = ev.score(real, "heldout", Prompts(p.labels, p.titles, captions=p.captions[1:] + p.captions[:1]))
    noise = ev.score(np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8), "heldout", p)
    assert abs(own["fd"]) < 1e-3 * noise["fd"] and noise["fd"] > 1
    assert own["agreement"] > other["agreement"] + 0.2 and own["prompt_acc"] > other["prompt_acc"]


# ----------------------------------------------------------------------------------------- several conditions


def test_multi_study_end_to_end_with_guidance_per_part(tmp_path, reader):
    study = _multi(reader, cfg={"part_scales": {"shape": [3.0]}})
    rc, out = _run(tmp_path, study)
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    dfm = next(r for r in res["runs"] if r["arm"] == "dfm")["variants"]["dfm"]
    keys = {"fd", "all_acc", "acc.shape", "acc.colour", "acc.cell", "one_object"}
    for p in dfm["curve"] + dfm["cfg"]:
        assert set(p) >= keys and "acc.size" not in p and p["split"] == "heldout"  # size is not conditioned on
        assert p["all_acc"] <= min(p["acc.shape"], p["acc.colour"], p["acc.cell"]) and np.isfinite(p["fd"])
    assert [(p["w"], p.get("part")) for p in dfm["cfg"]] == [(2.0, None), (3.0, "shape")]
    assert dfm["cfg"][0]["fd"] != dfm["cfg"][1]["fd"]  # joint and per-part guidance sample differently
    md = (out / "report" / "REPORT.md").read_text()
    assert "### Guidance on one condition at a time (multi-tiny, heldout prompts" in md and "| shape w=3 |" in md
    assert "| reader-FD ↓ | all-conditions accuracy ↑ | shape accuracy ↑ | colour accuracy ↑ | cell accuracy ↑ |" in md
    assert (out / "report" / "figures" / "multi-tiny-heldout-part-cfg.png").is_file()

    # the conditions asked for are those of the split's items; the real images satisfy them
    ev, lm = _evaluator(study, out)
    single = load_dataset("shapes", split="heldout", max_items=16, image_size=16)
    p = ev.prompts(lm, "heldout", 16)
    assert set(p.ids) == {"shape", "colour", "cell"}
    for part in p.ids:
        assert np.array_equal(p.ids[part], single.conditions[part].numpy())
        assert np.array_equal(p.labels[part].ids.numpy(), single.conditions[part].numpy())  # same vocabulary
    real = single.images.numpy()
    own = ev.score(real, "heldout", p)
    shifted = ev.score(real, "heldout", Prompts(p.labels, p.titles, ids={k: np.roll(v, 1) for k, v in p.ids.items()}))
    assert own["acc.colour"] > shifted["acc.colour"] + 0.3 and own["all_acc"] > shifted["all_acc"]
    assert abs(own["fd"]) < 1e-3


def test_sample_seeds_kid_equivalence_and_provenance(tmp_path, reader):
    """eval.sample_seeds: each unit samples once per seed and reports the mean with each seed's values (the first
    seed's equal a one-seed unit's); eval.kid_subsets adds KID; the TOST column; the environment of every unit."""
    import subprocess

    study = {**_multi(reader, sample_seeds=[3, 4], kid_subsets=5, kid_subset_size=8),
             "comparisons": [["dfm", "fm+posthoc"]], "equivalence": {"fd": 1000.0}}
    rc, out = _run(tmp_path, study)
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    dfm = next(r for r in res["runs"] if r["arm"] == "dfm")
    for p in dfm["variants"]["dfm"]["curve"] + dfm["variants"]["dfm"]["cfg"]:
        assert sorted(p["per_seed"]["fd"]) != [p["fd"]] * 2 and p["fd"] == pytest.approx(np.mean(p["per_seed"]["fd"]))
        assert p["kid"] == pytest.approx(np.mean(p["per_seed"]["kid"])) and len(p["per_seed"]["all_acc"]) == 2
    units = json.loads((out / "results" / "dfm" / "seed0.json").read_text())
    assert {u["env"] for u in units["units"].values()} == {0} and units["train"]["env"] == 0
    env = res["provenance"][0]
    assert env == dfm["provenance"][0] and env["torch"] == torch.__version__
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert env["commit"] == head.stdout.strip()
    md = (out / "report" / "REPORT.md").read_text()
    assert "ΔKID×10³ [95% CI]" in md and "fd within ±1000 (TOST, 90% CI)" in md
    # the first seed of a two-seed unit is the unit of that seed alone
    ev, lm = _evaluator(study, out)
    key, u = next((k, u["settings"]) for k, u in units["units"].items() if k.startswith("curve/dfm/32"))
    single = {k: v for k, v in u.items() if k != "seeds"} | {"seed": 3}
    alone = ev.sample_unit(lm, single)
    assert alone["fd"] == units["units"][key]["metrics"]["per_seed"]["fd"][0] and "per_seed" not in alone
    assert alone["kid"] == units["units"][key]["metrics"]["per_seed"]["kid"][0]
    # studies without the new keys plan the units they always did
    plain = plan_units(parse_compare_config(_multi(reader)), parse_compare_config(_multi(reader)).arms[0])
    assert all("seed" in u and "seeds" not in u and "kid_subsets" not in u for u in plain.values())


# ----------------------------------------------------------------------------------------- configs and errors


def test_shipped_study_configs_plan_their_units():
    t2i = load_compare_config(ROOT / "configs" / "compare" / "shapes-t2i.yaml")
    multi = load_compare_config(ROOT / "configs" / "compare" / "shapes-multi.yaml")
    for c in (t2i, multi):
        check_scoring(c)  # text arms / multi arms on the shapes sets, one kind each
        assert c.eval.scorer == "attributes" and c.eval.prompt_splits == ["test", "heldout"]
        assert c.seeds == [0, 1, 2] and c.eval.reader == "weights/shapes-reader.safetensors"
    units = plan_units(t2i, t2i.arms[0], "x")
    assert len(units) == 20 and units["cfg/fm+posthoc/4/heldout"]["split"] == "heldout"
    assert t2i.comparisons == [["dfm", "fm+posthoc"], ["dfm+bc", "fm"]]
    units = plan_units(multi, multi.arms[1], "x")
    assert len(units) == 32 and units["cfg/dfm+bc/shape=3/test"]["part"] == "shape"
    # a classifier study records none of the new keys (its results and units are what they were)
    tiny = load_compare_config(ROOT / "configs" / "compare" / "digits-tiny.yaml")
    assert "scorer" not in tiny.to_dict()["eval"] and "part_scales" not in tiny.to_dict()["eval"]["cfg"]
    units = plan_units(tiny, tiny.arms[0]).values()
    assert all("scorer" not in u and (u["stage"] == "along" or "split" not in u) for u in units)


@pytest.mark.parametrize(("change", "message"), [
    ({"reader": None}, "eval.scorer: attributes needs eval.reader"),
    ({"prompt_splits": ["test", "elsewhere"]}, "eval.prompt_splits must be distinct splits of train, test"),
    ({"scorer": "inception"}, "eval.scorer must be one of classifier, attributes"),
    ({"scorer": "classifier"}, "eval.reader is for eval.scorer: attributes"),
    ({"reference_max": 4}, r"eval.reference_max \(4\) must be >= the largest sample count"),
    ({"cfg": {"part_scales": {"shape": [-1.0]}}}, "part_scales.shape must be a non-empty list of finite weights"),
    ({"cfg": {"part_scales": {"shape": "a lot"}}}, "part_scales.shape"),
])
def test_bad_attribute_specs_are_clear_errors(change, message, reader):
    study = _multi(reader)
    for k, v in change.items():
        study["eval"][k] = {**study["eval"][k], **v} if isinstance(v, dict) else v
    with pytest.raises(CompareError, match=message):
        parse_compare_config(study)


def test_bad_studies_stop_with_one_line(tmp_path, reader, text_dir, capsys):
    cases = [
        ({**_text(reader, text_dir), "eval": {"curve": {"num": 8}}}, "--dry-run",
         "conditioning.kind=text samples are scored against their prompts: set eval.scorer: attributes"),
        ({**_text(reader, text_dir), "overrides": {**FAST, "data.name": "digits", "data.image_size": None,
                                                   "model.name": "SiT-N/4", "conditioning.kind": "class",
                                                   "conditioning.text_encoder": None}}, "--dry-run",
         "this arm is class-conditional (use eval.scorer: classifier)"),
        (_text(reader, text_dir, cfg={"part_scales": {"shape": [2.0]}}), "--dry-run",
         "arm fm has a text, not named parts"),
        (_multi(reader, cfg={"part_scales": {"size": [2.0]}}), "--dry-run", "parts ['size'] it is not conditioned on"),
        ({**_multi(reader), "arms": [{**ARMS[0], "stages": ["curve", "along"]}]}, "--dry-run",
         "arm fm: the along stage scores class labels"),
        (_multi(tmp_path / "none.safetensors"), "--no-report", "no such file"),
        (_multi(reader), "--classifier=x.safetensors", "--classifier: this study scores with the attribute reader"),
    ]
    for study, arg, message in cases:
        assert _run(tmp_path, study, arg)[0] == 2, message
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    # a reader for other scenes than the arms' (32 x 32 images, a 16 x 16 reader)
    study = _multi(reader, curve={"num": 2}, cfg={"num": 2})
    study["overrides"] = {**study["overrides"], "data.image_size": 32, "train.batch_size": 16}
    study["arms"] = [{**ARMS[0], "stages": ["curve"], "variants": ["fm"]}]
    assert _run(tmp_path, study, "--no-report")[0] == 2
    assert "eval.reader: the attribute reader was trained for other scenes" in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()  # refused before any training
