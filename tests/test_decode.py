"""Latent models produce images: the VAE recorded with the latents decodes the training grids and
``deltafm sample`` output (PNG grids, ADM ``samples.npz``); the decoded samples are exactly the VAE's
decoding of the raw samples; a wrong or missing VAE is a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_cases import run_cli
from deltafm.train.config import find_preset, load_config
from deltafm.train.loop import train

pytest.importorskip("diffusers")

FAST = ["log.progress_bar=false", "log.tensorboard=false", "train.threads=1"]


def _tiny_vae(folder: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny SiT trained 2 steps on latents of a tiny random VAE (recorded in the shards)."""
    from deltafm.data import write_latent_shards
    from deltafm.vae import load_autoencoder

    tmp = tmp_path_factory.mktemp("decode")
    ae = load_autoencoder(_tiny_vae(tmp / "vae"))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(24, 3, 16, 16, generator=g) * 2 - 1
    mean, std = ae.encode_moments(images)
    write_latent_shards(tmp / "lat", mean, torch.arange(24) % 3, std=std, shard_size=10, num_classes=3,
                        scale_factor=ae.scale_factor, metadata={"vae": ae.identity, "vae_source": ae.source})
    cfg = load_config(find_preset("digits-tiny"), [*FAST, "model.name=SiT-N/4", "data.name=latents",
                                                    f"data.root={tmp / 'lat'}", "train.batch_size=8", "train.steps=2",
                                                    "train.ckpt_every=2", "sample.every=0", "sample.num=6",
                                                    "sample.steps=2"])
    with torch.random.fork_rng(devices=[]):
        assert train(cfg, tmp / "run").status == "done"
    return tmp / "run", tmp / "vae"


def _sample(run: Path, out: Path, *extra: str) -> tuple[int, str]:
    rc, _, err = run_cli(["sample", "--ckpt", str(run), "--out", str(out), "--no-progress", "--threads", "1",
                          "--num", "5", "--steps", "2", "--batch-size", "3", *extra])
    return rc, err


def test_training_grid_of_a_latent_model_is_decoded(latent_run):
    from PIL import Image

    run, _ = latent_run
    grids = sorted((run / "samples").glob("step_*.png"))
    assert [p.name for p in grids] == ["step_00000002.png"]
    with Image.open(grids[0]) as im:
        assert im.mode == "RGB" and im.size[1] > 16  # pixels of the 16x16 decoded images, not 4x4 latents


def test_sample_decodes_exactly_the_raw_samples(latent_run, tmp_path):
    from deltafm.pixels import to_uint8_nhwc
    from deltafm.train.restore import load_for_sampling
    from deltafm.vae import load_autoencoder

    run, vae = latent_run
    assert _sample(run, tmp_path / "img")[0] == 0
    assert _sample(run, tmp_path / "raw", "--no-decode")[0] == 0
    assert {"grid.png", "samples.npz", "sample.json"} <= {p.name for p in (tmp_path / "img").iterdir()}
    lm = load_for_sampling(run)
    ae = load_autoencoder(vae)
    assert lm.data.vae_identity == ae.identity
    with np.load(tmp_path / "raw" / "latents.npz") as z:
        raw, labels = torch.from_numpy(z["arr_0"]), z["labels"]
    with np.load(tmp_path / "img" / "samples.npz") as z:
        decoded, labels2 = z["arr_0"], z["labels"]
    assert decoded.dtype == np.uint8 and decoded.shape == (5, 16, 16, 3)
    np.testing.assert_array_equal(labels, labels2)
    expect = to_uint8_nhwc(ae.decode(ae.to_model(raw), batch_size=3))
    np.testing.assert_array_equal(decoded, expect)


def test_a_missing_or_wrong_vae_is_an_error(latent_run, tmp_path):
    run, _ = latent_run
    other = _tiny_vae(tmp_path / "other", seed=1)
    rc, err = _sample(run, tmp_path / "a", "--vae", str(other))
    assert rc == 2 and "identity" in err and "encoded" in err
    rc, err = _sample(run, tmp_path / "b", "--vae", str(tmp_path))
    assert rc == 2 and "not a diffusers VAE folder" in err
    rc, err = _sample(run, tmp_path / "c", "--no-decode", "--vae", str(other))
    assert rc == 2 and "nothing to decode" in err
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_sample_json_records_the_decoder(latent_run, tmp_path):
    run, vae = latent_run
    assert _sample(run, tmp_path / "img")[0] == 0
    from deltafm.vae import load_autoencoder

    meta = json.loads((tmp_path / "img" / "sample.json").read_text())
    ae = load_autoencoder(vae)
    assert meta["vae"] == ae.identity and meta["vae_source"] == ae.source


def _tiny_gray_vae(folder: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=8).save_pretrained(folder)
    return folder


def test_a_study_on_latents_scores_decoded_samples_against_the_pixel_set(tmp_path, capsys):
    """Arms train on VAE latents of digits; the study decodes their samples and scores them with the classifier
    and reference statistics of the digits pixels (eval.images); the along stage is refused for latent arms."""
    import yaml

    from deltafm.data import load_dataset, write_latent_shards
    from deltafm.pixels import uint8_to_model
    from deltafm.study.cli import main as compare_main
    from deltafm.vae import load_autoencoder

    ae = load_autoencoder(_tiny_gray_vae(tmp_path / "vae"))
    ds = load_dataset("digits", split="train")
    mean, std = ae.encode_moments(uint8_to_model(ds.images[:200]))
    write_latent_shards(tmp_path / "lat", mean, ds.labels[:200], std=std, num_classes=10,
                        scale_factor=ae.scale_factor, metadata={"vae": ae.identity, "vae_source": ae.source})
    spec = {
        "name": "latent-tiny", "base": "digits-tiny",
        "overrides": {"data.name": "latents", "data.root": str(tmp_path / "lat"), "model.name": "SiT-N/4",
                      "train.batch_size": 50, "train.threads": 1},
        "seeds": [0], "total_images": 100, "eval_every_images": 100,
        "arms": [{"name": "dfm", "stages": ["curve"]}], "baseline": "dfm",
        "eval": {"classifier_epochs": 1, "batch_size": 50, "sample_seed": 3, "images": {"name": "digits"},
                 "curve": {"solver": "euler", "nfe": 2, "num": 20}},
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert compare_main(["--config", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"), "--quiet",
                         "--no-report"]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    (point,) = res["runs"][0]["variants"]["dfm"]["curve"]
    assert np.isfinite(point["fd"]) and 0 <= point["class_acc"] <= 1 and res["classifier"]["dataset"] == "digits"
    spec["eval"].pop("images")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(spec))
    assert compare_main(["--config", str(tmp_path / "t.yaml"), "--out", str(tmp_path / "out2"), "--quiet",
                         "--no-report"]) == 2
    assert "the arms train on latents: set eval.images" in capsys.readouterr().err
