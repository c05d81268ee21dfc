"""Bad-input table of ``deltafm eval`` (train-classifier, ref-stats, eval/score, convert-inception).

Each case runs the command in-process and expects exit status 2, exactly one ``error:`` line on stderr
naming the problem (a distinctive substring), no traceback, and every file of the fixture folder
unchanged (nothing written, nothing created). The fixtures are tiny: a digits classifier trained for one
epoch, its test-split statistics and 20 samples in the ADM layout; no case runs a forward pass over more
than a handful of images.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_cases import run_cli, tree_digest
from deltafm.data import load_dataset
from deltafm.eval.classifier import Classifier, ClassifierConfig, file_sha256, save_classifier, train_classifier
from deltafm.eval.features import reference_statistics
from deltafm.eval.metrics import save_reference_stats


class _Payload:
    """Unpickling this would print; a weights-only loader must refuse it."""

    def __reduce__(self):
        return (print, ("payload ran",))


def _sidecar(path: Path, digest: str | None = None) -> None:
    path.with_name(path.name + ".sha256").write_text(f"{digest or file_sha256(path)}  {path.name}\n")


def _samples(path: Path, images: np.ndarray, labels: np.ndarray | None = None, **extra: np.ndarray) -> None:
    arrays = {"arr_0": images, **({"labels": labels} if labels is not None else {}), **extra}
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _write_weight_files(k: Path, cls_path: Path) -> None:
    """Classifier and Inception weight files that must all be refused."""
    from safetensors.torch import save_file

    (k / "garbage.bin").write_bytes(b"\x00\x01 definitely not a weights file")
    (k / "pickle.pkl").write_bytes(pickle.dumps({"fc.weight": [0.0, 1.0]}))
    for name in ("cls-garbage.safetensors", "cls-pickle.pkl"):  # with a matching sidecar: the format is refused
        (k / name).write_bytes((k / ("garbage.bin" if "garbage" in name else "pickle.pkl")).read_bytes())
        _sidecar(k / name)
    (k / "cls-nosidecar.safetensors").write_bytes(cls_path.read_bytes())
    (k / "cls-badhash.safetensors").write_bytes(cls_path.read_bytes())
    _sidecar(k / "cls-badhash.safetensors", "0" * 64)
    save_file({"w": torch.zeros(2)}, str(k / "plain.safetensors"))
    _sidecar(k / "plain.safetensors")
    torch.save({"x": _Payload()}, k / "inc-global.pth")
    torch.save({"conv.weight": torch.zeros(2, 2)}, k / "inc-keys.pth")


def _write_sample_files(k: Path, test) -> None:
    imgs = test.images[:20].numpy().transpose(0, 2, 3, 1).copy()  # (20, 8, 8, 1) uint8, NHWC
    labels = test.labels[:20].numpy()
    _samples(k / "samples.npz", imgs, labels)
    np.save(k / "arr.npy", imgs)
    _samples(k / "object.npz", np.array([{"a": 1}] * 3, dtype=object))
    with open(k / "noarr0.npz", "wb") as fh:
        np.savez(fh, images=imgs)
    _samples(k / "float.npz", imgs.astype(np.float32))
    _samples(k / "nchw.npz", imgs.transpose(0, 3, 1, 2).copy())
    _samples(k / "floatlabels.npz", imgs, labels.astype(np.float32))
    _samples(k / "fewlabels.npz", imgs, labels[:5])
    _samples(k / "labels20.npz", imgs, np.arange(20))
    _samples(k / "neglabels.npz", imgs, labels - 1)
    _samples(k / "three.npz", imgs[:3], labels[:3])
    _samples(k / "big.npz", np.zeros((20, 28, 28, 1), np.uint8), labels)
    (k / "folder.npz").mkdir()


def _write_ref_files(k: Path, ref) -> None:
    save_reference_stats(k / "ref.npz", ref.mu, ref.sigma, ref.features, ref.meta)
    with open(k / "ref-nosigma.npz", "wb") as fh:
        np.savez(fh, mu=ref.mu)
    with open(k / "ref-badmeta.npz", "wb") as fh:
        np.savez(fh, mu=ref.mu, sigma=ref.sigma, meta=np.array("{not json"))
    with open(k / "ref-shapes.npz", "wb") as fh:
        np.savez(fh, mu=ref.mu[:5], sigma=ref.sigma)
    with open(k / "ref-nan.npz", "wb") as fh:
        np.savez(fh, mu=np.full_like(ref.mu, np.nan), sigma=ref.sigma)


def _write_data_files(k: Path) -> None:
    from PIL import Image
    from safetensors.torch import save_file

    (k / "latents-bad").mkdir()
    (k / "latents-bad" / "shard-00000.safetensors").write_bytes(b"garbage")
    (k / "latents-nan").mkdir()
    z = torch.zeros(4, 4, 2, 2)
    z[1, 0, 0, 0] = float("nan")
    save_file({"latents": z, "labels": torch.zeros(4, dtype=torch.int64)},
              str(k / "latents-nan" / "shard-00000.safetensors"),
              metadata={"format": "deltafm.latents", "format_version": "1", "scale_factor": "1.0",
                        "shift_factor": "0.0"})
    for cls in ("a", "b"):
        (k / "folder16" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((16, 16), 40 * i + 60, np.uint8)).save(k / "folder16" / cls / f"{i}.png")
    (k / "out").mkdir()


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Path:
    """Every file the cases point at (built once, ~2 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    k = tmp_path_factory.mktemp("eval-bad-inputs")
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    model = train_classifier(train, epochs=1, seed=0, widths=(8, 16, 32), progress=False)
    save_classifier(model, k / "cls.safetensors")
    save_classifier(Classifier(ClassifierConfig(widths=(8, 16, 32))), k / "other.safetensors")
    ref = reference_statistics(model, test.images, meta={"dataset": "digits"}, progress=False)
    _write_weight_files(k, k / "cls.safetensors")
    _write_sample_files(k, test)
    _write_ref_files(k, ref)
    _write_data_files(k)
    torch.set_num_threads(threads)
    return k


CLS = "classifier:{K}/cls.safetensors"
SCORE = ["--no-progress", "score", "--ref", "{K}/ref.npz", "--extractor", CLS]
REF = ["--no-progress", "ref-stats", "--dataset", "digits", "--out", "{K}/out/ref.npz"]
TRAIN = ["--no-progress", "train-classifier", "--out", "{K}/out/cls.safetensors"]

#: (id, argv with {K} for the fixture folder, substring of the error message)
CASES = [
    # train-classifier
    ("tc-unknown-dataset", [*TRAIN, "--dataset", "cifar-10"], "unknown dataset 'cifar-10'"),
    ("tc-epochs-0", [*TRAIN, "--dataset", "digits", "--epochs", "0"], "--epochs must be > 0"),
    ("tc-negative-lr", [*TRAIN, "--dataset", "digits", "--lr", "-1"], "--lr must be > 0"),
    ("tc-negative-wd", [*TRAIN, "--dataset", "digits", "--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    ("tc-batch-too-big", [*TRAIN, "--dataset", "digits", "--batch-size", "5000"], "larger than the training split"),
    ("tc-mnist-no-root", [*TRAIN, "--dataset", "mnist"], "needs a root folder"),
    ("tc-mnist-missing-root", [*TRAIN, "--dataset", "mnist", "--root", "{K}/nowhere"], "does not exist"),
    ("tc-digits-image-size", [*TRAIN, "--dataset", "digits", "--image-size", "16"],
     "only folder, webdataset, shapes, shapes-scenes do"),
    ("tc-folder-channels", [*TRAIN, "--dataset", "folder", "--root", "{K}/folder16", "--channels", "2"],
     "channels must be 1 or 3"),
    ("tc-latents-garbage", [*TRAIN, "--dataset", "latents", "--root", "{K}/latents-bad"],
     "not a readable safetensors file"),
    ("tc-out-is-folder", ["train-classifier", "--dataset", "digits", "--out", "{K}/out"], "is a folder"),
    # ref-stats
    ("rs-unknown-split", [*REF, "--split", "valid", "--extractor", CLS], "unknown split 'valid'"),
    ("rs-one-item", [*REF, "--max-items", "1", "--extractor", CLS], "need at least 2 images, got 1"),
    ("rs-zero-items", [*REF, "--max-items", "0", "--extractor", CLS], "--max-items must be > 0"),
    ("rs-spec-no-path", [*REF, "--extractor", "classifier"], "must be 'classifier:PATH' or 'inception:PATH'"),
    ("rs-spec-kind", [*REF, "--extractor", "resnet:{K}/cls.safetensors"], "unknown extractor kind 'resnet'"),
    ("rs-cls-missing", [*REF, "--extractor", "classifier:{K}/none.safetensors"], "classifier weights not found"),
    ("rs-cls-garbage", [*REF, "--extractor", "classifier:{K}/cls-garbage.safetensors"], "is not a safetensors file"),
    ("rs-cls-pickle", [*REF, "--extractor", "classifier:{K}/cls-pickle.pkl"], "is not a safetensors file"),
    ("rs-cls-no-sidecar", [*REF, "--extractor", "classifier:{K}/cls-nosidecar.safetensors"], "no hash sidecar"),
    ("rs-cls-bad-hash", [*REF, "--extractor", "classifier:{K}/cls-badhash.safetensors"], "sha256 mismatch"),
    ("rs-cls-not-deltafm", [*REF, "--extractor", "classifier:{K}/plain.safetensors"], "no 'deltafm' metadata"),
    ("rs-inception-missing", [*REF, "--extractor", "inception:{K}/none.pth"], "never downloads"),
    ("rs-inception-garbage", [*REF, "--extractor", "inception:{K}/garbage.bin"],
     "neither a safetensors file nor a torch.save state dict"),
    ("rs-inception-pickle", [*REF, "--extractor", "inception:{K}/pickle.pkl"],
     "neither a safetensors file nor a torch.save state dict"),
    ("rs-inception-global", [*REF, "--extractor", "inception:{K}/inc-global.pth"],
     "not a weights-only state dict"),
    ("rs-inception-keys", [*REF, "--extractor", "inception:{K}/inc-keys.pth"], "does not match the FID Inception-v3"),
    ("rs-shape-vs-classifier", ["--no-progress", "ref-stats", "--dataset", "folder", "--root", "{K}/folder16",
                                "--channels", "1", "--split", "train", "--extractor", CLS, "--out", "{K}/out/r.npz"],
     "was trained on 1x8x8"),
    ("rs-latents-are-not-images", ["ref-stats", "--dataset", "latents", "--root", "{K}/latents-nan", "--extractor", CLS,
                        "--out", "{K}/out/r.npz"], "holds latents, not images"),
    ("rs-threads-0", ["--threads", "0", *REF[1:], "--extractor", CLS], "--threads must be > 0"),
    ("rs-device-gpu", ["--device", "cuda:99", *REF[1:], "--extractor", CLS], "no such GPU"),
    ("rs-device-name", ["--device", "tpu", *REF[1:], "--extractor", CLS], "--device must be auto, cpu or cuda"),
    # eval / score: the samples file
    ("ev-samples-garbage", [*SCORE, "--samples", "{K}/garbage.bin"], "is not an .npz archive"),
    ("ev-samples-pickle", [*SCORE, "--samples", "{K}/pickle.pkl"], "with arr_0 uint8 (N, H, W, C)"),
    ("ev-samples-npy", [*SCORE, "--samples", "{K}/arr.npy"], "is not an .npz archive"),
    ("ev-samples-object", [*SCORE, "--samples", "{K}/object.npz"], "cannot read 'arr_0'"),
    ("ev-samples-missing", [*SCORE, "--samples", "{K}/none.npz"], "no such file"),
    ("ev-samples-folder", [*SCORE, "--samples", "{K}/folder.npz"], "is a folder"),
    ("ev-no-arr0", [*SCORE, "--samples", "{K}/noarr0.npz"], "no 'arr_0'"),
    ("ev-float-images", [*SCORE, "--samples", "{K}/float.npz"], "arr_0 is float32"),
    ("ev-nchw", [*SCORE, "--samples", "{K}/nchw.npz"], "transpose it to (N, H, W, C)"),
    ("ev-float-labels", [*SCORE, "--samples", "{K}/floatlabels.npz"], "labels must be integers"),
    ("ev-label-count", [*SCORE, "--samples", "{K}/fewlabels.npz"], "5 labels for 20 images"),
    ("ev-labels-out-of-range", [*SCORE, "--samples", "{K}/labels20.npz"], "labels must lie in 0..9"),
    ("ev-negative-labels", ["score", "--samples", "{K}/neglabels.npz", "--ref", "{K}/ref.npz", "--extractor", CLS],
     "labels must be class ids >= 0"),
    ("ev-too-few", [*SCORE, "--samples", "{K}/three.npz"], "need at least 4 images, got 3"),
    ("ev-size-vs-classifier", [*SCORE, "--samples", "{K}/big.npz"], "was trained on 1x8x8"),
    # eval / score: the statistics, the extractor, the options
    ("ev-ref-garbage", ["score", "--samples", "{K}/samples.npz", "--ref", "{K}/garbage.bin", "--extractor", CLS],
     "reference statistics must be an .npz written by"),
    ("ev-ref-missing", ["score", "--samples", "{K}/samples.npz", "--ref", "{K}/none.npz", "--extractor", CLS],
     "no such file"),
    ("ev-ref-no-sigma", ["score", "--samples", "{K}/samples.npz", "--ref", "{K}/ref-nosigma.npz", "--extractor",
                         CLS], "missing ['sigma']"),
    ("ev-ref-bad-meta", ["score", "--samples", "{K}/samples.npz", "--ref", "{K}/ref-badmeta.npz", "--extractor",
                         CLS], "'meta' is not JSON"),
    ("ev-ref-shapes", ["score", "--samples", "{K}/samples.npz", "--ref", "{K}/ref-shapes.npz", "--extractor", CLS],
     "shapes do not fit together"),
    ("ev-ref-nan", ["score", "--samples", "{K}/samples.npz", "--ref", "{K}/ref-nan.npz", "--extractor", CLS],
     "hold NaN or inf"),
    ("ev-other-extractor", ["eval", "--samples", "{K}/samples.npz", "--ref", "{K}/ref.npz", "--extractor",
                            "classifier:{K}/other.safetensors"], "reference statistics were made with classifier:"),
    ("ev-inception-pickle", ["score", "--samples", "{K}/samples.npz", "--ref", "{K}/ref.npz", "--extractor",
                             "inception:{K}/pickle.pkl"], "neither a safetensors file"),
    ("ev-pr-max-le-k", [*SCORE, "--samples", "{K}/samples.npz", "--pr-max", "3"], "pr_max (3) must be larger than k"),
    ("ev-pr-max-zero", [*SCORE, "--samples", "{K}/samples.npz", "--pr-max", "0"], "expected a positive integer"),
    ("ev-pr-max-word", [*SCORE, "--samples", "{K}/samples.npz", "--pr-max", "some"], "'match' or 'none'"),
    ("ev-k-zero", [*SCORE, "--samples", "{K}/samples.npz", "--k", "0"], "--k must be > 0"),
    ("ev-kid-subsets", [*SCORE, "--samples", "{K}/samples.npz", "--kid-subsets", "-1"], "--kid-subsets must be >= 0"),
    ("ev-kid-size", [*SCORE, "--samples", "{K}/samples.npz", "--kid-subset-size", "1"], "--kid-subset-size >= 2"),
    ("ev-splits-zero", [*SCORE, "--samples", "{K}/samples.npz", "--splits", "0"], "--splits must be > 0"),
    ("ev-batch-zero", [*SCORE, "--samples", "{K}/samples.npz", "--batch-size", "0"], "--batch-size must be > 0"),
    ("ev-fd-method", [*SCORE, "--samples", "{K}/samples.npz", "--fd-method", "svd"], "invalid choice: 'svd'"),
    ("ev-out-is-folder", [*SCORE, "--samples", "{K}/samples.npz", "--out", "{K}/out"], "is a folder"),
    # convert-inception
    ("ci-pickle", ["convert-inception", "--in", "{K}/pickle.pkl", "--out", "{K}/out/inc.safetensors"],
     "neither a safetensors file"),
    ("ci-global", ["convert-inception", "--in", "{K}/inc-global.pth", "--out", "{K}/out/inc.safetensors"],
     "Unsupported global"),
    ("ci-missing", ["convert-inception", "--in", "{K}/none.pth", "--out", "{K}/out/inc.safetensors"],
     "never downloads"),
    ("ci-same-file", ["convert-inception", "--in", "{K}/inc-keys.pth", "--out", "{K}/inc-keys.pth"],
     "would overwrite the input"),
]


@pytest.mark.parametrize("argv, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_eval_bad_input(kit, argv, needle, capsys):
    before = tree_digest(kit)
    rc, out, err = run_cli(["eval", *(a.replace("{K}", str(kit)) for a in argv)])
    lines = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert needle in err, err
    assert "Traceback" not in err and "allow_pickle=`" not in err and "weights_only=False" not in err
    assert "payload ran" not in out + capsys.readouterr().out
    assert tree_digest(kit) == before


@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_the_good_inputs_of_the_table_work(kit):
    """The table's fixtures differ from good input only in the named defect."""
    rc, out, err = run_cli(["eval", *(a.replace("{K}", str(kit)) for a in SCORE), "--samples",
                            f"{kit}/samples.npz", "--out", f"{kit}/out/m.json"])
    assert rc == 0, err
    assert (kit / "out" / "m.json").is_file() and '"class_accuracy"' in out
    (kit / "out" / "m.json").unlink()
