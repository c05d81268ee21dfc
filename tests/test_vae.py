"""deltafm.vae: a diffusers AutoencoderKL loaded from its folder, its scaled space, its identity, and the
errors a user meets (not a VAE folder, another class, no weights, unreachable hub id)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from deltafm.vae import AutoencoderError, load_autoencoder, vae_identity  # noqa: E402
from deltafm.vae.autoencoder import split_source  # noqa: E402


def _save(folder: Path, seed: int = 0, **cfg) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kw = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
              latent_channels=4, norm_num_groups=4)
    AutoencoderKL(**{**kw, **cfg}).save_pretrained(folder)
    return folder


def test_moments_scale_and_decoding_are_diffusers_own(tmp_path):
    from diffusers import AutoencoderKL

    folder = _save(tmp_path / "vae", scaling_factor=0.5, shift_factor=0.25)
    ae = load_autoencoder(folder)
    ref = AutoencoderKL.from_pretrained(folder).eval()
    assert (ae.scale_factor, ae.shift_factor, ae.downsample, ae.latent_shape(16)) == (0.5, 0.25, 2, (4, 8, 8))
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mu, sigma = ae.encode_moments(x)
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        assert torch.equal(mu, post.mean) and torch.equal(sigma, post.std)
        z_model = ae.to_model(mu)
        assert torch.equal(z_model, (mu - 0.25) * 0.5)
        assert torch.equal(ae.decode(z_model), ref.decode(z_model / 0.5 + 0.25).sample.clamp(-1, 1))
        chunks = torch.cat([ref.decode(z / 0.5 + 0.25).sample.clamp(-1, 1) for z in z_model.split(2)])
        assert torch.equal(ae.decode(z_model, batch_size=2), chunks)  # decoded in chunks of batch_size
    assert load_autoencoder(folder, scale_factor=0.2, shift_factor=0.0).scale_factor == 0.2


def test_identity_follows_the_weights_not_the_loading(tmp_path):
    a = load_autoencoder(_save(tmp_path / "a"))
    assert load_autoencoder(tmp_path / "a").identity == a.identity == vae_identity(a.vae)
    assert load_autoencoder(_save(tmp_path / "b", seed=1)).identity != a.identity
    with pytest.raises(AutoencoderError, match="latents were made with AutoencoderKL:0000"):
        load_autoencoder(tmp_path / "a", expect_identity="AutoencoderKL:0000")


def test_folders_that_are_not_a_vae_are_named(tmp_path):
    with pytest.raises(AutoencoderError, match="no config.json"):
        load_autoencoder(tmp_path)
    folder = _save(tmp_path / "vae")
    cfg = json.loads((folder / "config.json").read_text())
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet2DModel"}))
    with pytest.raises(AutoencoderError, match="_class_name is 'UNet2DModel', expected 'AutoencoderKL'"):
        load_autoencoder(tmp_path / "unet")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AutoencoderError, match="no weights"):
        load_autoencoder(tmp_path / "empty")
    with pytest.raises(AutoencoderError, match="no such folder"):
        load_autoencoder(tmp_path / "missing" / "vae")
    # a pipeline folder: the VAE in its vae/ subfolder
    assert load_autoencoder(tmp_path, subfolder="vae").identity == load_autoencoder(folder).identity


def test_hub_sources_with_a_subfolder_round_trip():
    assert split_source("stabilityai/sd3-medium:vae") == ("stabilityai/sd3-medium", "vae")
    assert split_source("stabilityai/sd-vae-ft-ema") == ("stabilityai/sd-vae-ft-ema", None)
    assert split_source("org/name:vae", "other") == ("org/name:vae", "other")
    assert split_source("/abs/path:x") == ("/abs/path:x", None)
