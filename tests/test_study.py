"""deltafm.study beyond test_compare.py: the study spec through the typed-config engine, presets shipped
in the package, one scoring path shared with ``deltafm eval eval`` (and equal to the study's former
inline scoring), and a tiny study on a dataset in a non-default folder (the data builder of training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import deltafm
from deltafm.data import load_dataset, write_idx
from deltafm.eval.classifier import Classifier, ClassifierConfig, save_classifier
from deltafm.study.cli import main as compare_main
from deltafm.study.evaluator import Evaluator
from deltafm.study.spec import CompareError, base_path, load_compare_config, parse_compare_config
from deltafm.train.config import ConfigError, find_preset, preset_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def idx_root(tmp_path_factory) -> Path:
    """scikit-learn's digits written as an MNIST-format folder (gzipped IDX files) outside any default."""
    root = tmp_path_factory.mktemp("idx-digits")
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_dataset("digits", split=split)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", ds.images[:, 0].numpy())
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", ds.labels.numpy().astype(np.uint8))
    return root


def _study(root: Path, **eval_spec) -> dict:
    """A one-arm study on the IDX folder: 2 steps of batch 64, the curve stage only."""
    return {
        "name": "idx-tiny", "base": "digits-tiny",  # a preset name
        "overrides": {"data.name": "mnist", "data.root": str(root), "train.batch_size": 64, "train.threads": 1,
                      "log.every": 1},
        "seeds": [0], "total_images": 128, "eval_every_images": 128,
        "arms": [{"name": "fm", "overrides": {"objective.lam": 0.0}, "stages": ["curve"]}],
        "eval": {"classifier_epochs": 1, "batch_size": 50, "sample_seed": 3,
                 "curve": {"solver": "euler", "nfe": 2, "num": 20}, **eval_spec},
    }


# ----------------------------------------------------------------------------------------- the spec


def test_study_spec_uses_the_typed_engine(tmp_path):
    assert issubclass(CompareError, ConfigError)
    p = tmp_path / "s.yaml"
    text = (f"name: big\nbase: {ROOT / 'configs' / 'digits-tiny.yaml'}\ntotal_images: 1e6\n"
            "eval_every_images: 2.5e5\narms: [{name: fm}]\neval: {cfg: {scales: [2]}}\n")
    p.write_text(text)
    c = load_compare_config(p)
    assert (c.total_images, c.eval_every_images) == (1_000_000, 250_000)
    assert type(c.total_images) is int and type(c.eval_every_images) is int
    assert c.eval.cfg.scales == [2.0] and c.eval.cfg.interval == (0.0, 1.0)
    p.write_text(text + "seeds: [0, 1.5]\n")
    with pytest.raises(CompareError, match="'seeds\\[1\\]' must be an integer"):
        load_compare_config(p)
    p.write_text(text.replace("eval: {cfg: {scales: [2]}}", "eval: {curve: {nmu: 3}}"))
    with pytest.raises(CompareError, match="unknown key 'eval.curve.nmu'; did you mean 'eval.curve.num'"):
        load_compare_config(p)


def test_presets_ship_inside_the_package():
    pkg = Path(deltafm.__file__).resolve().parent / "presets"
    path = find_preset("fmnist-unet-deltafm")
    assert path.is_file() and path.resolve().parent == pkg
    assert preset_dir().resolve() == pkg and (pkg / "compare" / "fmnist-unet.yaml").is_file()
    # configs/ of the checkout is the same folder, and a study's base resolves through it (relative path)
    study = ROOT / "configs" / "compare" / "fmnist-unet.yaml"
    assert study.resolve() == (pkg / "compare" / "fmnist-unet.yaml").resolve()
    assert base_path(load_compare_config(study)).resolve() == find_preset("fmnist-unet-fm").resolve()
    # ... or through the preset name
    assert base_path(parse_compare_config(_study(Path("/nowhere")))).resolve() == find_preset("digits-tiny").resolve()


# ----------------------------------------------------------------------------------------- one scoring path


def test_eval_cli_scores_exactly_like_the_study(tmp_path, idx_root, one_thread):
    from deltafm.eval.cli import main as eval_main
    from deltafm.eval.features import extract
    from deltafm.eval.metrics import (
        feature_statistics,
        frechet_distance,
        inception_score,
        load_reference_stats,
        precision_recall,
    )

    torch.manual_seed(0)
    model = Classifier(ClassifierConfig(widths=(8, 16, 32))).eval()
    cls = tmp_path / "cls.safetensors"
    save_classifier(model, cls)
    c = parse_compare_config(_study(idx_root, classifier=str(cls)))
    ev = Evaluator(c, tmp_path / "out", "cpu", lambda _: None)
    assert ev.ref.meta["root"] == str(idx_root) and ev.ref.meta["count"] == 360  # the folder's test split

    # samples: 100 noisy training images in the ADM layout, with labels
    train = load_dataset("mnist", root=idx_root, split="train")
    rng = np.random.default_rng(1)
    imgs = train.images[:100].numpy().transpose(0, 2, 3, 1).astype(np.int64) + rng.integers(-40, 40, (100, 8, 8, 1))
    imgs = np.clip(imgs, 0, 255).astype(np.uint8)
    labels = train.labels[:100].numpy()
    ours = ev.score(imgs, labels)

    # the study's former inline scoring, verbatim: the numbers stay what they were
    f = extract(ev.classifier, imgs, batch_size=50, layout="NHWC", progress=False)
    g = np.random.default_rng(0)
    n = min(len(imgs), len(ev.ref.features))
    real = ev.ref.features[np.sort(g.permutation(len(ev.ref.features))[:n])]
    mu, sigma = feature_statistics(f.features)
    probs = torch.softmax(torch.from_numpy(f.logits), dim=1).numpy()
    p, r = precision_recall(real, f.features, k=3)
    assert ours == {"fd": frechet_distance(mu, sigma, ev.ref.mu, ev.ref.sigma, method="eigh"),
                    "class_acc": float((f.logits.argmax(axis=1) == labels).mean()),
                    "is": inception_score(probs, splits=1)[0], "precision": p, "recall": r}

    # deltafm eval eval with the study's settings on the same samples file: identical numbers
    samples, out = tmp_path / "samples.npz", tmp_path / "m.json"
    np.savez(samples, arr_0=imgs, labels=labels)
    assert eval_main(["--no-progress", "eval", "--samples", str(samples), "--ref", ev.reference_path,
                      "--extractor", f"classifier:{cls}", "--fd-method", "eigh", "--splits", "1",
                      "--pr-max", "match", "--batch-size", "50", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert (res["fd"], res["inception_score"], res["precision"], res["recall"]) == \
        (ours["fd"], ours["is"], ours["precision"], ours["recall"])
    assert res["class_accuracy"]["overall"] == ours["class_acc"]
    assert (res["fd_method"], res["is_splits"], res["pr_max"], res["pr_real"], res["pr_fake"]) == \
        ("eigh", 1, "match", 100, 100)

    # ref-stats and train-classifier read the same folder with --root
    ref2 = tmp_path / "ref.npz"
    assert eval_main(["--no-progress", "ref-stats", "--dataset", "mnist", "--root", str(idx_root), "--split",
                      "test", "--extractor", f"classifier:{cls}", "--out", str(ref2)]) == 0
    assert np.array_equal(load_reference_stats(ref2).mu, ev.ref.mu)
    assert eval_main(["--no-progress", "train-classifier", "--dataset", "mnist", "--root", str(idx_root),
                      "--epochs", "1", "--out", str(tmp_path / "c2.safetensors")]) == 0
    assert eval_main(["--no-progress", "ref-stats", "--dataset", "mnist", "--split", "test",
                      "--extractor", f"classifier:{cls}", "--out", str(ref2)]) == 2  # mnist needs a root


# ----------------------------------------------------------------------------------------- one data builder


def test_tiny_study_on_a_dataset_in_another_folder(tmp_path, idx_root):
    cfg, out = tmp_path / "study.yaml", tmp_path / "out"
    cfg.write_text(yaml.safe_dump(_study(idx_root)))
    assert compare_main(["--config", str(cfg), "--out", str(out), "--quiet", "--no-report"]) == 0
    res = json.loads((out / "results.json").read_text())
    (run,) = res["runs"]
    assert run["status"] == "done"
    (point,) = run["variants"]["fm"]["curve"]
    assert point["images"] == 128 and np.isfinite(point["fd"]) and 0 <= point["class_acc"] <= 1
    assert res["classifier"]["dataset"] == "mnist" and res["classifier"]["reference"]["root"] == str(idx_root)
    assert res["classifier"]["reference"]["count"] == 360
    assert (out / "samples" / "fm" / "seed0.png").is_file()
