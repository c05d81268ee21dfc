"""ADM-compatible evaluation: sFID features, reference batches (arr_0 / mu, sigma, mu_s, sigma_s), the IS
split convention, and `deltafm eval` end to end with a randomly initialised Inception port.

The Inception port always resizes to 299x299, so a forward pass costs ~0.2 s per image on one CPU
thread: the end-to-end part scores 6-image sets, and runs every network pass once (module fixture).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cli_cases import run_cli
from deltafm.eval import metrics as M
from deltafm.eval.inception import SPATIAL_FEATURE_DIM, FIDInceptionV3

N_IMAGES, SIZE = 6, 32


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _random_inception(seed: int = 0) -> FIDInceptionV3:
    """He-normal convolutions, so that pool3 features stay O(1) through the ~95 layers."""
    torch.manual_seed(seed)
    model = FIDInceptionV3().eval()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    return model


def _images(n: int, seed: int) -> np.ndarray:
    """uint8 (n, SIZE, SIZE, 3) smooth colour fields plus a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    out = np.stack([np.stack([100 + 60 * np.sin(rng.uniform(2, 7) * xx + rng.uniform(2, 7) * yy + rng.uniform(0, 6))
                              for _ in range(3)], axis=-1) for _ in range(n)])
    out += rng.normal(0, 6, size=out.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _brighter(images: np.ndarray, shift: int) -> np.ndarray:
    return np.clip(images.astype(np.int16) + shift, 0, 255).astype(np.uint8)


def _eval(*argv: str) -> dict:
    rc, out, err = run_cli(["eval", "--threads", "1", "--no-progress", *argv])
    assert rc == 0, err
    return json.loads(out)


# ----------------------------------------------------------------------------- no network


def test_inception_score_adm_split_size():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5) * 0.3, size=10)

    def score(chunk):
        marginal = chunk.mean(0)
        return math.exp(float(np.mean(np.sum(chunk * (np.log(chunk) - np.log(marginal)), axis=1))))

    expected = [score(p[0:4]), score(p[4:8]), score(p[8:10])]  # 4 + 4 + 2, the last chunk shorter (ADM)
    mean, std = M.inception_score(p, split_size=4)
    assert mean == pytest.approx(np.mean(expected), rel=1e-12) and std == pytest.approx(np.std(expected), rel=1e-12)
    assert M.inception_score(p, split_size=10) == M.inception_score(p, splits=1)
    assert M.inception_score(p, split_size=5000) == M.inception_score(p, splits=1)  # fewer samples: one chunk
    assert M.inception_score(p, split_size=5) == pytest.approx(M.inception_score(p, splits=2), rel=1e-12)
    with pytest.raises(ValueError):
        M.inception_score(p, split_size=0)


@pytest.mark.parametrize("n", [5, 12, 80])  # fewer, about as many and more samples than dimensions
def test_frechet_distance_lowrank_is_exact(n):
    rng = np.random.default_rng(n)
    d = 30
    f = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.2
    g = rng.normal(size=(200, d)) @ rng.normal(size=(d, d)) * 0.3
    mu2, s2 = M.feature_statistics(g)
    mu1, s1 = M.feature_statistics(f)
    # the routes differ by round-off in the square roots of near-zero eigenvalues (~1e-8 relative)
    assert M.frechet_distance_lowrank(f, mu2, s2) == pytest.approx(M.frechet_distance(mu1, s1, mu2, s2, method="eigh"),
                                                                   rel=1e-7)
    assert M.frechet_distance_lowrank(f, mu2, s2) == pytest.approx(M.frechet_distance(mu1, s1, mu2, s2), rel=1e-7)
    if n <= d:  # where `auto` uses it; for N > D the N x N matrix has N - D round-off eigenvalues instead
        assert abs(M.frechet_distance_lowrank(f, mu1, s1)) < 1e-10 * np.trace(s1)  # a set against itself


def test_reference_stats_with_spatial_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    f, s = rng.normal(size=(20, 4)), rng.normal(size=(20, 3))
    (mu, sigma), (mu_s, sigma_s) = M.feature_statistics(f), M.feature_statistics(s)
    M.save_reference_stats(tmp_path / "r.npz", mu, sigma, f, {"a": 1}, mu_s=mu_s, sigma_s=sigma_s)
    ref = M.load_reference_stats(tmp_path / "r.npz")
    assert np.array_equal(ref.mu_s, mu_s) and np.array_equal(ref.sigma_s, sigma_s) and ref.meta == {"a": 1}
    np.savez(tmp_path / "adm.npz", mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)  # ADM layout: no meta
    ref = M.load_reference_stats(tmp_path / "adm.npz")
    assert ref.features is None and ref.meta == {} and ref.mu_s.shape == (3,)
    np.savez(tmp_path / "half.npz", mu=mu, sigma=sigma, mu_s=mu_s)
    with pytest.raises(M.EvalKeyError, match="mu_s/sigma_s"):
        M.load_reference_stats(tmp_path / "half.npz")
    np.savez(tmp_path / "bad.npz", mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s[:2])
    with pytest.raises(M.EvalInputError, match="mu_s"):
        M.load_reference_stats(tmp_path / "bad.npz")


# ----------------------------------------------------------------------------- the port's outputs


def test_spatial_features_are_mixed_6d_branch1x1(one_thread):
    model = _random_inception()
    x = torch.rand(2, 3, 40, 40) * 2 - 1
    seen = {}
    hook = model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    with torch.no_grad():
        out = model.outputs(x)
        full = model.fc(out["features"])
    hook.remove()
    assert seen["x"].shape == (2, 192, 17, 17)
    assert out["spatial"].shape == (2, SPATIAL_FEATURE_DIM) == (2, 2023)
    # TF's NHWC flattening: index (h * 17 + w) * 7 + c
    assert torch.equal(out["spatial"].reshape(2, 17, 17, 7), seen["x"][:, :7].permute(0, 2, 3, 1))
    assert out["spatial"][0, 3 * 7] == seen["x"][0, 0, 0, 3]
    assert out["features"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    torch.testing.assert_close(out["logits"] + model.fc.bias, full)  # IS logits: fc without its bias (ADM)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def adm_run(tmp_path_factory):
    """Random Inception weights, a 6-image folder, its ref-stats, and four `deltafm eval eval` runs."""
    from PIL import Image
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("adm")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        weights = tmp / "inception-random.safetensors"
        save_file({k: v.contiguous() for k, v in _random_inception().state_dict().items()}, str(weights))
        ext = f"inception:{weights}"
        base = _images(N_IMAGES, seed=3)
        (tmp / "folder" / "all").mkdir(parents=True)
        for i, img in enumerate(base):
            Image.fromarray(img).save(tmp / "folder" / "all" / f"{i}.png")
        run = {"tmp": tmp, "ext": ext, "base": base}
        run["ref_stats"] = _eval("ref-stats", "--root", str(tmp / "folder"), "--extractor", ext, "--save-images",
                                 "--out", str(tmp / "ref.npz"))
        with np.load(tmp / "ref.npz") as z:
            run["ref_files"] = {k: z[k] for k in z.files}
        r = run["ref_files"]
        np.savez(tmp / "stats-only.npz", mu=r["mu"], sigma=r["sigma"], mu_s=r["mu_s"], sigma_s=r["sigma_s"])
        np.savez(tmp / "images-only.npz", arr_0=base)
        for shift in (0, 30, 90):
            np.savez(tmp / f"samples{shift}.npz", arr_0=_brighter(base, shift))
        # the same set against a reference batch of images only (statistics computed from arr_0)
        run[0] = _eval("eval", "--samples", str(tmp / "samples0.npz"), "--ref", str(tmp / "images-only.npz"),
                       "--extractor", ext, "--out", str(tmp / "m0.json"))
        # shifted sets against ADM-style statistics only, and against the full ref-stats file
        run[30] = _eval("eval", "--samples", str(tmp / "samples30.npz"), "--ref", str(tmp / "stats-only.npz"),
                        "--extractor", ext)
        run[90] = _eval("eval", "--samples", str(tmp / "samples90.npz"), "--ref", str(tmp / "ref.npz"),
                        "--extractor", ext)
    finally:
        torch.set_num_threads(old)
    return run


def test_ref_stats_from_folder_writes_an_adm_reference_batch(adm_run):
    r = adm_run["ref_files"]
    assert {"mu", "sigma", "mu_s", "sigma_s", "features", "arr_0", "meta"} <= set(r)
    assert r["mu"].shape == (2048,) and r["sigma"].shape == (2048, 2048)
    assert r["mu_s"].shape == (2023,) and r["sigma_s"].shape == (2023, 2023)
    assert np.array_equal(r["arr_0"], adm_run["base"])  # PNG round trip, no resize at the native size
    meta = json.loads(str(r["meta"]))
    assert meta["dataset"] == "folder" and meta["image_hw"] == [SIZE, SIZE] and meta["count"] == N_IMAGES
    assert adm_run["ref_stats"]["sfid_stats"] is True


def test_fid_sfid_of_a_set_against_itself_is_zero(adm_run):
    m = adm_run[0]
    assert abs(m["fd"]) < 1e-3 and abs(m["sfid"]) < 1e-3
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["protocol"] == "adm" and m["is_split_size"] == 5000 and m["is_splits"] == 1
    assert m["fd_method"] == m["sfid_method"] == "lowrank"  # auto: 6 samples < 2048 dimensions
    assert m["pr_max"] is None and m["pr_real"] == m["pr_fake"] == N_IMAGES and m["pr_k"] == 3
    assert m["inception_score"] >= 1.0 and "class_accuracy" not in m
    assert m["reference"]["stats_source"] == "arr_0"
    assert json.loads((adm_run["tmp"] / "m0.json").read_text())["fd"] == m["fd"]


def test_fid_and_sfid_grow_with_the_brightness_shift(adm_run):
    fd = [adm_run[s]["fd"] for s in (0, 30, 90)]
    sfid = [adm_run[s]["sfid"] for s in (0, 30, 90)]
    assert fd[0] < 1e-3 < fd[1] < fd[2] and fd[1] > 100 * abs(fd[0])
    assert sfid[0] < 1e-3 < sfid[1] < sfid[2] and sfid[1] > 100 * abs(sfid[0])
    assert "precision" not in adm_run[30]  # statistics only: no manifold to compare with
    assert adm_run[30]["reference"]["stats_source"] == "file"
    assert 0.0 <= adm_run[90]["precision"] <= 1.0 and adm_run[90]["reference"]["features_source"] == "file"


# ----------------------------------------------------------------------------- bad reference batches


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    np.savez(d / "samples.npz", arr_0=rng.integers(0, 256, size=(4, SIZE, SIZE, 3), dtype=np.uint8))
    np.savez(d / "labels-only.npz", labels=np.arange(4))
    np.savez(d / "small.npz", arr_0=rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8))
    np.savez(d / "float.npz", arr_0=rng.random((4, SIZE, SIZE, 3)))
    np.savez(d / "nchw.npz", arr_0=rng.integers(0, 256, size=(4, 3, SIZE, SIZE), dtype=np.uint8))
    np.savez(d / "mu-only.npz", mu=np.zeros(3))
    np.savez(d / "meta-64.npz", mu=np.zeros(3), sigma=np.eye(3), meta=np.array(json.dumps({"image_hw": [64, 64]})))
    (d / "text.npz").write_text("not an archive")
    (d / "w.safetensors").write_bytes(b"unused: these cases fail before the weights are read")
    return d


@pytest.mark.parametrize("ref,extra,message", [
    ("labels-only.npz", (), "neither statistics (mu, sigma) nor images (arr_0)"),
    ("small.npz", (), "reference images are 16x16 but the samples are 32x32"),
    ("meta-64.npz", (), "reference images are 64x64 but the samples are 32x32"),
    ("float.npz", (), "not uint8 (N, H, W, 1 or 3)"),
    ("nchw.npz", (), "transpose it to (N, H, W, C)"),
    ("mu-only.npz", (), "missing ['sigma']"),
    ("text.npz", (), "is not an .npz archive"),
    ("missing.npz", (), "no such file"),
    ("small.npz", ("--splits", "2", "--is-split-size", "5"), "give --splits or --is-split-size, not both"),
    ("small.npz", ("--is-split-size", "0"), "--is-split-size must be > 0"),
])
def test_bad_reference_batches_exit_2(bad_dir, ref, extra, message):
    out = bad_dir / "metrics.json"
    rc, stdout, stderr = run_cli(["eval", "--threads", "1", "eval", "--samples", str(bad_dir / "samples.npz"),
                                  "--ref", str(bad_dir / ref), "--extractor", f"inception:{bad_dir / 'w.safetensors'}",
                                  "--out", str(out), *extra])
    assert rc == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], stderr
    assert not out.exists()
