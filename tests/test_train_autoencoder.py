"""``deltafm train-autoencoder``: a tiny diffusers AutoencoderKL on the bundled digits, end to end.

Exact checks: the saved folder loads with ``load_autoencoder`` and holds the EMA weights of the last
checkpoint (identity and every tensor); ``scaling_factor`` is 1/√Var(z) recomputed here from the loaded
VAE's posterior moments; a run stopped by SIGTERM and resumed ends with the same bytes as one that was not;
the KL term is the one of ``torch.distributions``; bad input is one ``error:`` line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from deltafm.data import load_dataset  # noqa: E402
from deltafm.eval.frechet import feature_statistics, frechet_distance  # noqa: E402
from deltafm.pixels import model_to_uint8, uint8_to_model  # noqa: E402
from deltafm.prepare import autoencoder_cli  # noqa: E402
from deltafm.prepare.autoencoder_config import AutoencoderSettings  # noqa: E402
from deltafm.prepare.autoencoder_data import fit_images, load_autoencoder_data, target_size  # noqa: E402
from deltafm.prepare.autoencoder_run import train_autoencoder  # noqa: E402
from deltafm.prepare.autoencoder_train import kl_per_element, lr_at  # noqa: E402
from deltafm.train.checkpoint import load_checkpoint  # noqa: E402
from deltafm.vae import load_autoencoder, vae_identity  # noqa: E402

TINY = dict(dataset="digits", max_items=64, heldout=32, block_channels=(8, 16), norm_groups=4, latent_channels=2,
            steps=6, batch_size=16, warmup=2, checkpoint_every=3, grid_every=3, log_every=2, scale_items=48,
            device="cpu", progress=False)
TINY_ARGS = ["--dataset", "digits", "--max-items", "64", "--heldout", "32", "--block-channels", "8,16",
             "--norm-groups", "4", "--latent-channels", "2", "--steps", "6", "--batch-size", "16", "--warmup", "2",
             "--checkpoint-every", "3", "--grid-every", "3", "--log-every", "2", "--scale-items", "48",
             "--device", "cpu", "--no-progress"]


def quiet(msg: str) -> None:
    pass


def tiny(**kw) -> AutoencoderSettings:
    return AutoencoderSettings(**{**TINY, **kw})


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ae") / "run"
    result = train_autoencoder(tiny(), out, say=quiet)
    assert (result.status, result.step) == ("done", 6)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- the result


def test_saved_vae_holds_the_ema_weights_of_the_last_checkpoint(finished):
    ae = load_autoencoder(finished / "vae")
    record = json.loads((finished / "autoencoder.json").read_text())
    assert ae.identity == record["identity"]
    assert (ae.image_channels, ae.latent_channels, ae.downsample) == (1, 2, 2)
    assert ae.latent_shape(8) == (2, 4, 4) and record["latent_shape"] == [2, 4, 4]

    ck = load_checkpoint(finished / "checkpoints" / "step_00000006")
    assert ck.state["reason"] == "final" and ck.state["step"] == 6 and ck.state["images_seen"] == 96
    saved = ae.vae.state_dict()
    assert sorted(saved) == sorted(ck.ema)
    assert all(torch.equal(saved[k], ck.ema[k]) for k in saved)
    assert not all(torch.equal(saved[k], ck.model[k]) for k in saved)  # EMA, not the live weights

    from diffusers import AutoencoderKL

    fresh = AutoencoderKL.from_config(dict(ae.vae.config))
    fresh.load_state_dict(ck.ema)
    assert vae_identity(fresh) == ae.identity


def test_scaling_factor_is_one_over_the_latent_std(finished):
    ae = load_autoencoder(finished / "vae")
    x = uint8_to_model(load_dataset("digits", split="train", max_items=64).images[:48])
    mu, sigma = ae.encode_moments(x)
    mu, sigma = mu.double(), sigma.double()
    var = (mu - mu.mean()).pow(2).mean() + sigma.pow(2).mean()  # Var(μ + σε) over elements and ε
    assert ae.scale_factor == 1.0 / math.sqrt(float(var))
    assert ae.vae.config.shift_factor is None and ae.shift_factor == 0.0
    assert abs(ae.scale_factor**2 * float(var) - 1.0) < 1e-12  # unit-variance model latents
    record = json.loads((finished / "autoencoder.json").read_text())
    assert record["scaling_factor"] == ae.scale_factor and record["latent_std"] == math.sqrt(float(var))


def test_heldout_psnr_and_rfd_recomputed(finished):
    ae = load_autoencoder(finished / "vae")
    metrics = json.loads((finished / "metrics.json").read_text())["final"]
    held = load_dataset("digits", split="test", max_items=32).images
    mu, _ = ae.encode_moments(uint8_to_model(held))
    rec = model_to_uint8(ae.vae.decode(mu).sample.clamp(-1, 1)).numpy().astype(np.float64)
    mse = ((held.numpy().astype(np.float64) - rec) ** 2).reshape(32, -1).mean(axis=1)
    assert metrics["heldout_items"] == 32
    assert math.isclose(metrics["psnr_db"], float(np.mean(10 * np.log10(255.0**2 / mse))), rel_tol=1e-12)
    # 8x8 images: the 8x8 average pool is the identity, so the features are the pixels in [-1, 1]
    real = uint8_to_model(held).flatten(1).double().numpy()
    fake = uint8_to_model(torch.from_numpy(rec).to(torch.uint8)).flatten(1).double().numpy()
    fd = frechet_distance(*feature_statistics(real), *feature_statistics(fake), method="eigh")
    assert metrics["rfd_features"] == "pixels-avgpool8x8" and math.isclose(metrics["rfd"], fd, rel_tol=1e-9)


def test_grids_show_originals_over_reconstructions(finished):
    from PIL import Image

    for name in ("samples/step_00000003.png", "samples/step_00000006.png", "recon.png"):
        with Image.open(finished / name) as img:  # 16 images: 2 x (8 originals over 8 recons), cells 32 px
            assert img.size == (8 * 34 + 2, 4 * 34 + 2)
    metrics = json.loads((finished / "metrics.json").read_text())
    assert [e["step"] for e in metrics["evals"]] == [3, 6]
    assert [h["step"] for h in metrics["history"]] == [2, 4, 6]


# ---------------------------------------------------------------------------------------------- resume


def test_sigterm_then_resume_is_bit_exact(tmp_path, finished):
    out = tmp_path / "run"

    def stop_at_4(step: int) -> None:
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    first = train_autoencoder(tiny(), out, on_step=stop_at_4, say=quiet)
    assert (first.status, first.step, first.signum) == ("interrupted", 4, signal.SIGTERM)
    assert load_checkpoint(out / "checkpoints" / "step_00000004").state["reason"] == "signal"
    assert not (out / "vae").exists() and not (out / "autoencoder.json").exists()
    second = train_autoencoder(tiny(), out, resume="auto", say=quiet)
    assert (second.status, second.step) == ("done", 6)

    a = load_checkpoint(finished / "checkpoints" / "step_00000006")
    b = load_checkpoint(out / "checkpoints" / "step_00000006")
    for part in ("model", "ema"):
        x, y = getattr(a, part), getattr(b, part)
        assert sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)
    for k in ("optimizer", "sampler", "rng"):
        assert _same(a.state[k], b.state[k]), k
    strip = lambda hs: [{k: v for k, v in h.items() if k != "images_per_s"} for h in hs]  # noqa: E731
    assert strip(a.state["history"]) == strip(b.state["history"]) and a.state["evals"] == b.state["evals"]
    assert (finished / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    ra, rb = (json.loads((p / "autoencoder.json").read_text()) for p in (finished, out))
    keys = ("identity", "scaling_factor", "latent_mean", "metrics")
    assert [ra[k] for k in keys] == [rb[k] for k in keys]


def _same(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, np.ndarray):
        return isinstance(y, np.ndarray) and np.array_equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, list | tuple):
        return len(x) == len(y) and all(_same(u, v) for u, v in zip(x, y))
    return x == y


def test_resume_of_a_finished_run_changes_nothing(finished, capsys):
    before = _files(finished)
    assert autoencoder_cli.main([*TINY_ARGS, "--out", str(finished), "--resume", "auto"]) == 0
    assert _files(finished) == before


# ---------------------------------------------------------------------------------------------- the maths


def test_kl_per_element_is_the_kl_of_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) * 2
    logvar = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) * 3
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    torch.testing.assert_close(kl_per_element(mean, logvar), torch.distributions.kl_divergence(q, p).mean(),
                               rtol=1e-12, atol=1e-12)
    assert kl_per_element(torch.zeros(2, 2), torch.zeros(2, 2)).item() == 0.0  # q = p


def test_learning_rate_schedule():
    s = tiny(lr=0.01, warmup=4, steps=12)
    assert [lr_at(i, s) for i in range(4)] == [0.01 * k / 4 for k in (1, 2, 3, 4)]
    assert lr_at(4, s) == 0.01 and lr_at(8, s) == 0.01 * 0.5 * (1 + math.cos(math.pi / 2)) and lr_at(12, s) == 0.0


def test_default_size_gives_an_even_latent_side():
    assert [target_size(28, None, 4), target_size(8, None, 2), target_size(8, None, 4), target_size(28, 12, 4)] == [
        32, 8, 8, 12]
    assert [target_size(256, None, 8), target_size(100, None, 8)] == [256, 112]


def test_pad_replicates_edges_and_crops_back_exactly():
    x = torch.randint(0, 256, (3, 1, 28, 28), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    y, pad = fit_images(x, 32, "pad")
    assert pad == (2, 2, 2, 2) and y.shape == (3, 1, 32, 32) and y.dtype == torch.uint8
    assert torch.equal(y[..., 2:30, 2:30], x)
    assert torch.equal(y[..., 0, 2:30], x[..., 0, :]) and torch.equal(y[..., 1, 2:30], x[..., 0, :])
    assert torch.equal(y[..., 31, 2:30], x[..., 27, :]) and torch.equal(y[..., 2:30, 0], x[..., :, 0])
    assert (y[..., :2, :2] == x[..., :1, :1]).all()
    r, pad_r = fit_images(x, 32, "resize")
    assert r.shape == (3, 1, 32, 32) and pad_r == (0, 0, 0, 0)


def test_adm_fit_is_the_bicubic_resize_of_prepare_latents():
    from PIL import Image

    x = torch.randint(0, 256, (2, 1, 28, 28), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    y, pad = fit_images(x, 32, "adm")  # square: the ADM crop is one BICUBIC resize of the shorter side to 32
    want = [np.asarray(Image.fromarray(a[0].numpy()).resize((32, 32), Image.Resampling.BICUBIC)) for a in x]
    assert pad == (0, 0, 0, 0) and torch.equal(y[:, 0], torch.from_numpy(np.stack(want)))


def test_gray_to_rgb_and_padding_for_the_sd_vae_shape():
    fitted = load_autoencoder_data(tiny(channels=3, image_size=12, block_channels=(8, 16, 16)))
    assert fitted.train.shape == (64, 3, 12, 12) and fitted.pad == (2, 2, 2, 2) and fitted.replicated
    original = load_dataset("digits", split="train", max_items=64).images
    assert torch.equal(fitted.native(fitted.train, reduce_channels=True), original)
    assert torch.equal(fitted.train[:, 1], fitted.train[:, 0]) and torch.equal(fitted.train[:, 2], fitted.train[:, 0])


# ---------------------------------------------------------------------------------------------- bad input


def _replace(args: list[str], flag: str, value: str) -> list[str]:
    i = args.index(flag)
    return [*args[:i + 1], value, *args[i + 2:]]


@pytest.mark.parametrize("change, message", [
    (("--dataset", "nope"), "unknown dataset 'nope'"),
    (("--block-channels", "8,16,16"), None),  # fine on its own; with --image-size 10 below
    (("--norm-groups", "3"), "--norm-groups 3 must divide every block's channels"),
    (("--batch-size", "65"), "--batch-size 65 is larger than the 64 training images"),
    (("--steps", "0"), "--steps must be >= 1"),
    (("--heldout", "1"), "--heldout must be >= 2"),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, change, message):
    out = tmp_path / "run"
    args = _replace(TINY_ARGS, *change)
    if message is None:
        args, message = [*args, "--image-size", "10"], "--image-size 10 is not a multiple of the downsampling factor 4"
    assert autoencoder_cli.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_more_bad_input(tmp_path, capsys):
    from deltafm import cli

    cases = [
        ([*TINY_ARGS, "--image-size", "4"], "padding cannot shrink them"),
        ([*TINY_ARGS, "--extractor", f"classifier:{tmp_path / 'missing.safetensors'}"], "missing.safetensors"),
    ]
    for args, message in cases:
        assert cli.main(["train-autoencoder", *args, "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
        assert not (tmp_path / "run").exists()


def test_out_holding_a_run_needs_resume_and_the_same_settings(finished, tmp_path, capsys):
    assert autoencoder_cli.main([*TINY_ARGS, "--out", str(finished)]) == 2
    assert "already holds a finished autoencoder" in capsys.readouterr().err
    half = tmp_path / "half"  # checkpoints of a run, no result yet
    shutil.copytree(finished / "checkpoints", half / "checkpoints")
    before = _files(half)
    assert autoencoder_cli.main([*TINY_ARGS, "--out", str(half)]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert autoencoder_cli.main([*_replace(TINY_ARGS, "--steps", "7"), "--out", str(half), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "--steps 6 -> 7" in err
    assert _files(half) == before
