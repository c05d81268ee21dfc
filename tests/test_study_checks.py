"""deltafm.study.checks on a tiny digits study: the sample-size curves (their last point is the full-set metric of
the same samples), the real-data floor, a second classifier, the contrast-stretch control (a = 1 is the raw
samples), the paired summaries, the figures and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cli_cases import run_cli
from deltafm.study.checks import balanced_order, contrast_stretch, main, pixel_histogram
from deltafm.study.cli import main as compare_main
from deltafm.study.spec import CompareError

ROOT = Path(__file__).resolve().parents[1]


def test_contrast_stretch_and_histogram_closed_forms():
    img = np.array([[[[0], [100], [200]]]], dtype=np.uint8)  # one 1 x 3 image, mean 100
    assert contrast_stretch(img, 2.0).ravel().tolist() == [0, 100, 255]  # -100 and 300 clipped
    assert contrast_stretch(img, 0.5).ravel().tolist() == [50, 100, 150]
    assert np.array_equal(contrast_stretch(img, 1.0), img)
    assert pixel_histogram(img, bins=4) == pytest.approx([1 / 3, 1 / 3, 0, 1 / 3])


def test_balanced_order_labels_like_the_samples():
    labels = np.repeat(np.arange(3), [5, 4, 6])  # three classes of unequal size
    idx = balanced_order(labels, 10, 3, np.random.default_rng(0))
    assert len(set(idx.tolist())) == 10  # distinct items
    assert labels[idx].tolist() == [i % 3 for i in range(10)]  # the order of generate.labels_for
    assert np.array_equal(idx, balanced_order(labels, 10, 3, np.random.default_rng(0)))  # seeded
    with pytest.raises(CompareError, match="class 1 has 4 training images, fewer than the 5"):
        balanced_order(labels, 13, 3, np.random.default_rng(0))


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, Path]:
    """The digits smoke study cut to 2 steps per arm, trained only (its checkpoints are what the checks read)."""
    root = tmp_path_factory.mktemp("checks")
    spec = yaml.safe_load((ROOT / "configs" / "compare" / "digits-tiny.yaml").read_text())
    spec.update(base=str(ROOT / "configs" / "digits-tiny.yaml"), total_images=128, eval_every_images=128,
                arms=spec["arms"][:2], comparisons=[["dfm", "fm+posthoc"], ["dfm", "fm"]])
    spec["eval"]["classifier_epochs"] = 1
    cfg = root / "study.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    old = torch.get_num_threads()
    assert compare_main(["--config", str(cfg), "--out", str(root / "out"), "--quiet", "--train-only"]) == 0
    torch.set_num_threads(old)
    return cfg, root / "out"


def test_checks_end_to_end(study, tmp_path):
    cfg, out = study
    rc, _, err = run_cli(["eval", "--no-progress", "train-classifier", "--dataset", "digits", "--epochs", "1",
                          "--seed", "1", "--widths", "8", "16", "24", "--out", str(tmp_path / "second.safetensors")])
    assert rc == 0, err
    rc = main(["--config", str(cfg), "--out", str(out), "--num", "40", "--sizes", "10", "20", "40",
               "--second-classifier", str(tmp_path / "second.safetensors"), "--stretch", "1.0", "1.2",
               "--kid-subsets", "5", "--kid-subset-size", "10", "--json", str(tmp_path / "c.json"),
               "--figures", str(tmp_path / "fig")])
    assert rc == 0
    r = json.loads((tmp_path / "c.json").read_text())
    assert r["variants"] == ["fm", "fm+posthoc", "dfm", "dfm+bc"] and r["sizes"] == [10, 20, 40]
    assert len(r["floor"]["fd"]) == 3 and r["floor"]["fd"][0] > r["floor"]["fd"][-1] > 0  # FD's few-sample bias
    assert len(r["floor_balanced"]["fd"]) == 3 and r["floor_balanced"]["fd"] != r["floor"]["fd"]
    assert r["floor_seed"] == 0
    for v in r["variants"]:
        ss, full = r["sample_size"][v]["0"], r["networks"]["study"][v]["0"]
        assert ss["fd"][-1] == pytest.approx(full["fd"]) and ss["kid"][-1] == pytest.approx(full["kid"])
        assert set(r["networks"]["second"][v]["0"]) == {"fd", "kid", "class_acc"}
    assert r["networks"]["second"]["fm"]["0"]["fd"] != r["networks"]["study"]["fm"]["0"]["fd"]
    stretch = r["stretch"]["fm"]
    # a = 1 gives the same pixels (up to float32 round-off of another memory layout in the features)
    assert stretch["1"]["0"] == pytest.approx(r["networks"]["study"]["fm"]["0"], rel=1e-6)
    assert stretch["1.2"]["0"]["fd"] != pytest.approx(stretch["1"]["0"]["fd"], rel=1e-3)
    pairs = [(p["variant"], p["baseline"]) for p in r["paired"]["second.fd"]]
    assert ("dfm", "fm") in pairs and ("dfm", "fm+posthoc") in pairs and len(set(pairs)) == len(pairs)
    assert r["provenance"]["torch"] == torch.__version__
    for name in ("digits-tiny-sample-size.png", "digits-tiny-pixel-histograms.png"):
        assert (tmp_path / "fig" / name).read_bytes()[:4] == b"\x89PNG"
    # the markdown, redrawn from the JSON alone
    assert main(["--config", str(cfg), "--out", str(out), "--json", str(tmp_path / "c.json"), "--from-json",
                 "--markdown", str(tmp_path / "c.md"), "--link-prefix", "figures"]) == 0
    md = (tmp_path / "c.md").read_text()
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- BEGIN checks:digits-tiny -->\nold\n<!-- END checks:digits-tiny -->\nafter\n")
    assert main(["--config", str(cfg), "--out", str(out), "--json", str(tmp_path / "c.json"), "--from-json",
                 "--link-prefix", "figures", "--update", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("before\n<!-- BEGIN checks:digits-tiny -->\n"
                           "<!-- generated by python -m deltafm.study.checks")
    assert md.rstrip("\n") in text and "old" not in text and text.endswith("<!-- END checks:digits-tiny -->\nafter\n")
    doc.write_text("no block\n")
    assert main(["--config", str(cfg), "--out", str(out), "--json", str(tmp_path / "c.json"), "--from-json",
                 "--update", str(doc)]) == 2
    floor, at_random = r["floor_balanced"]["fd"][0], r["floor"]["fd"][0]
    assert f"| real images, class-balanced (floor) | {floor:.3g} / " in md and "ΔFD (second)" in md
    assert f"| real images, at random | {at_random:.3g} / " in md
    assert "| dfm | fm+posthoc | 1 |" in md and "![FD and KID against n](figures/digits-tiny-sample-size.png)" in md
    assert "Contrast stretch of fm samples" in md and "| 1.2 | 1 |" in md
    # results of before the balanced floor: one floor row; --floors-only adds the balanced one, as computed
    # with the samples, and refuses a stored floor it cannot reproduce
    old = {k: v for k, v in r.items() if k not in ("floor_balanced", "floor_seed")}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert main(["--config", str(cfg), "--out", str(out), "--json", str(tmp_path / "old.json"), "--from-json",
                 "--markdown", str(tmp_path / "old.md")]) == 0
    assert "| real images (floor) | " in (tmp_path / "old.md").read_text()
    assert main(["--config", str(cfg), "--out", str(out), "--json", str(tmp_path / "old.json"), "--floors-only",
                 "--markdown", str(tmp_path / "new.md"), "--link-prefix", "figures"]) == 0
    redone = json.loads((tmp_path / "old.json").read_text())
    for metric in ("fd", "kid"):
        assert redone["floor_balanced"][metric] == pytest.approx(r["floor_balanced"][metric], rel=1e-9)
    assert redone["floor"] == r["floor"] and redone["floors_provenance"]["torch"] == torch.__version__
    assert (tmp_path / "new.md").read_text() == md
    old["floor"] = {"fd": [x + 1 for x in r["floor"]["fd"]], "kid": r["floor"]["kid"]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert main(["--config", str(cfg), "--out", str(out), "--json", str(tmp_path / "old.json"), "--floors-only"]) == 2
    assert json.loads((tmp_path / "old.json").read_text()) == old  # nothing written


def test_checks_errors(study, tmp_path, capsys):
    cfg, out = study
    base = ["--config", str(cfg), "--out", str(out), "--json", str(tmp_path / "c.json")]
    assert main([*base, "--num", "20", "--sizes", "10", "40"]) == 2
    assert "--sizes must lie in 2..--num" in capsys.readouterr().err
    assert main([*base, "--variants", "nothing", "--num", "20", "--sizes", "10"]) == 2
    assert "unknown variant 'nothing'" in capsys.readouterr().err
    assert main(["--config", str(cfg), "--out", str(tmp_path / "empty"), "--json", str(tmp_path / "c.json"),
                 "--num", "20", "--sizes", "10"]) == 2
    assert "no checkpoint of arm fm seed 0" in capsys.readouterr().err
    assert main([*base, "--from-json"]) == 2 and "no such file" in capsys.readouterr().err
    (tmp_path / "c.json").write_text("not json")
    assert main([*base, "--from-json"]) == 2 and "not readable JSON" in capsys.readouterr().err
    (tmp_path / "c.json").write_text("{}")
    assert main([*base, "--from-json"]) == 2 and "not the results of" in capsys.readouterr().err
    # an --update target without the block, or no file at all, stops the checks before any sampling
    (tmp_path / "c.json").unlink()
    (tmp_path / "doc.md").write_text("no block\n")
    for target in (tmp_path / "doc.md", tmp_path / "missing.md"):
        assert main([*base, "--num", "20", "--sizes", "10", "--update", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1, err
        assert not (tmp_path / "c.json").exists()
    assert (tmp_path / "doc.md").read_text() == "no block\n"


def test_a_classifier_study_with_noise_seeds_kid_and_equivalence(study, tmp_path, capsys):
    """The classifier path of eval.sample_seeds / kid_subsets / equivalence on the trained smoke study."""
    cfg, out = study
    spec = yaml.safe_load(cfg.read_text())
    spec["eval"].update(sample_seeds=[7, 8], kid_subsets=4, kid_subset_size=10,
                        curve={"solver": "euler", "nfe": 2, "num": 20})
    spec.update(equivalence={"fd": 5.0}, main_variants=None)
    for arm in spec["arms"]:
        arm["stages"] = ["curve"]
        for v in arm.get("variants") or []:
            v.pop("stages", None)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    old = torch.get_num_threads()
    bogus = compare_main(["--config", str(tmp_path / "s.yaml"), "--out", str(out), "--train-device", "tpu"])
    assert bogus == 2 and "--train-device must be auto, cpu or cuda[:N], got 'tpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():  # a device that is not there stops the study before anything runs
        assert compare_main(["--config", str(tmp_path / "s.yaml"), "--out", str(out), "--quiet",
                             "--train-device", "cuda"]) == 2
    assert compare_main(["--config", str(tmp_path / "s.yaml"), "--out", str(out), "--quiet",
                         "--train-device", "cpu"]) == 0
    torch.set_num_threads(old)
    assert "train.device: cpu" in (out / "compare.yaml").read_text()
    res = json.loads((out / "results.json").read_text())
    for run in res["runs"]:
        for v in run["variants"].values():
            (point,) = v["curve"]
            assert len(point["per_seed"]["fd"]) == 2 and point["fd"] == pytest.approx(np.mean(point["per_seed"]["fd"]))
            assert point["kid"] == pytest.approx(np.mean(point["per_seed"]["kid"]))
        assert run["provenance"][0]["torch"] == torch.__version__
    md = (out / "report" / "REPORT.md").read_text()
    assert "ΔKID×10³ [95% CI]" in md and "fd within ±5 (TOST, 90% CI)" in md
    assert " | KID ↓ |" in md.split("Final quality")[1].splitlines()[2]  # KID beside FD in the final table
    assert "Sampling error of the final point" in md and "| ΔFD dfm − fm+posthoc | 1 | 2 |" in md
