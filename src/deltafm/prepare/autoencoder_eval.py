"""Measuring an autoencoder: reconstructions, PSNR, rFD, the latent scale, and the recon grids.

**Reconstruction** x̂ = D(μ(x)) from the posterior mean (``sampled``: D(μ + σ·ε) with a seeded ε),
clipped to [−1, 1] and quantised to uint8 like a saved image (:func:`deltafm.pixels.model_to_uint8`).

**PSNR** on the dataset's own pixels (the padding cropped off, :meth:`Fitted.native`), per image and then
averaged over the held-out images: PSNR_i = 10 log₁₀(255² / MSE_i), MSE_i the mean of (p − p̂)² over
the C·H·W uint8 values of image i; an exact reconstruction counts as 100 dB (MSE_i floored at
255²·10⁻¹⁰) so that the mean stays finite.

**rFD**: the Fréchet distance (:func:`deltafm.eval.frechet.frechet_distance`, ``eigh``) between Gaussians
fitted to features of the held-out originals and of their reconstructions, both in the dataset's own
form (crop; a replicated gray channel averaged back). Features: ``--extractor classifier:PATH`` (the
project's classifier of that dataset, :mod:`deltafm.eval.classifier`; penultimate layer) or
``inception:PATH``. Without one the features are **pixel statistics** (``pixels-avgpool8x8``): each image
average-pooled to 8 × 8 per channel (``F.adaptive_avg_pool2d``), a 64·C vector in [−1, 1]; this compares
the coarse layout of reconstructions with that of the originals, not their fine detail. FD values of the
two feature kinds are not comparable.

**Latent scale** (how SD's 0.18215 was derived): over the first ``scale_items`` training images, with the
posterior N(μ, σ²) per element, the training latents are z = μ + σ·ε, and over all elements and draws

    m = mean(μ),    Var(z) = mean((μ − m)²) + mean(σ²)        (law of total variance; exact, no sampling)

``scaling_factor = 1 / √Var(z)`` and ``shift_factor = m`` with ``--shift`` (else None), so the model-space
latents (z − shift)·scale of :meth:`deltafm.vae.Autoencoder.to_model` have unit variance.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deltafm.eval.features import check_images, extract, get_extractor
from deltafm.eval.frechet import feature_statistics, frechet_distance
from deltafm.pixels import model_to_uint8, to_uint8_nhwc, uint8_to_model
from deltafm.vae import Autoencoder

from .autoencoder_config import TrainAutoencoderError
from .autoencoder_data import Fitted

__all__ = ["PixelFeatures", "reconstruct", "psnr", "latent_statistics", "recon_grid", "FeatureSet",
           "heldout_metrics"]

PSNR_CAP_DB = 100.0
GRID_ITEMS = 16


@torch.no_grad()
def reconstruct(vae: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 256,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (N, C, S, S) → reconstructions in [−1, 1], float32 on the CPU: D(μ), or D(μ + σ·ε) when a
    ``generator`` (on ``device``) is given."""
    vae.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = uint8_to_model(images[start:start + batch_size]).to(device)
        post = vae.encode(x).latent_dist
        z = post.mean
        if generator is not None:
            z = z + post.std * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        out.append(vae.decode(z).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def psnr(originals: torch.Tensor, recon: torch.Tensor, fitted: Fitted) -> float:
    """Mean over images of 10 log₁₀(255² / MSE_i) on the native pixels (see the module docstring)."""
    a = fitted.native(originals).double()
    b = fitted.native(model_to_uint8(recon)).double()
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(255.0**2 * 10 ** (-PSNR_CAP_DB / 10))
    return float((10.0 * torch.log10(255.0**2 / mse)).mean())


class PixelFeatures(nn.Module):
    """Pixel-statistics features: x (N, C, H, W) in [−1, 1] → adaptive 8 × 8 average pool, flattened (64·C)."""

    extractor_id = "pixels-avgpool8x8"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.float(), 8).flatten(1)

    def logits(self, x: torch.Tensor) -> None:
        return None


class FeatureSet:
    """The rFD feature network and the held-out originals' statistics (computed once per run)."""

    def __init__(self, spec: str | None, fitted: Fitted, device: torch.device) -> None:
        self.device = device
        self.extractor: Any = PixelFeatures() if spec is None else get_extractor(spec, device)
        self.native = fitted.native(fitted.heldout, reduce_channels=True)
        check_images(self.extractor, self.native, "NCHW", "held-out images")  # a classifier of another shape
        self.mu, self.sigma = feature_statistics(self._features(self.native))

    @property
    def name(self) -> str:
        return str(self.extractor.extractor_id)

    def _features(self, images: torch.Tensor) -> np.ndarray:
        return extract(self.extractor, images, batch_size=256, device=self.device, progress=False).features

    def rfd(self, recon_native: torch.Tensor) -> float:
        mu, sigma = feature_statistics(self._features(recon_native))
        return float(frechet_distance(self.mu, self.sigma, mu, sigma, method="eigh"))


@torch.no_grad()
def latent_statistics(ae: Autoencoder, images: torch.Tensor, batch_size: int = 256) -> tuple[float, float]:
    """(m, √Var(z)) of the training latents z = μ + σ·ε over ``images`` (uint8), see the module docstring."""
    mus, sigmas = [], []
    for start in range(0, images.shape[0], batch_size):
        mu, sigma = ae.encode_moments(uint8_to_model(images[start:start + batch_size]))
        mus.append(mu.cpu())
        sigmas.append(sigma.cpu())
    mu, sigma = torch.cat(mus).double(), torch.cat(sigmas).double()
    m = mu.mean()
    var = (mu - m).pow(2).mean() + sigma.pow(2).mean()
    return float(m), float(var.sqrt())


def recon_grid(originals: torch.Tensor, recon: torch.Tensor, ncol: int = 8) -> np.ndarray:
    """uint8 N×H×W×C tiles: rows of ``ncol`` originals, each over the row of their reconstructions."""
    o = to_uint8_nhwc(uint8_to_model(originals))
    r = to_uint8_nhwc(recon)
    rows = []
    for start in range(0, o.shape[0], ncol):
        rows += [o[start:start + ncol], r[start:start + ncol]]
    return np.concatenate(rows)


def heldout_metrics(vae: nn.Module, fitted: Fitted, features: FeatureSet, device: torch.device,
                    seed_generator: torch.Generator) -> tuple[dict[str, Any], torch.Tensor]:
    """The final held-out numbers (PSNR of D(μ) and of D(μ + σε), rFD) and the D(μ) reconstructions."""
    held = fitted.heldout
    recon = reconstruct(vae, held, device)
    sampled = reconstruct(vae, held, device, generator=seed_generator)
    rec_native = fitted.native(model_to_uint8(recon), reduce_channels=True)
    metrics = {
        "heldout_items": int(held.shape[0]),
        "psnr_db": psnr(held, recon, fitted),
        "psnr_sampled_db": psnr(held, sampled, fitted),
        "rfd": features.rfd(rec_native),
        "rfd_features": features.name,
        "l1_model_space": float((recon - uint8_to_model(held)).abs().mean()),
    }
    if not all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)):
        raise TrainAutoencoderError(f"non-finite held-out metrics {metrics}: the training diverged; lower --lr")
    return metrics, recon
