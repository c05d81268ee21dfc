"""Training a small ``diffusers.AutoencoderKL``: the loss, one optimizer step, and the state of a run.

**Loss** for a batch x (B, C, S, S) in [−1, 1], with the encoder's diagonal Gaussian posterior
q(z | x) = N(μ(x), diag σ(x)²) (log σ² clamped to [−30, 20] by diffusers) and one draw
z = μ + σ·ε, ε ~ N(0, I) from the run's generator, x̂ = D(z):

    L = w₁ · mean|x̂ − x| + w₂ · mean (x̂ − x)² + β · KL̄

    KL̄ = mean over the B·c·h·w latent elements of KL(N(μ, σ²) ‖ N(0, 1)) = ½ (μ² + σ² − 1 − log σ²)

(:func:`kl_per_element`; the means run over all elements, so L does not change with the batch or image
size). Defaults w₁ = w₂ = 1, β = 1e-6 (the MSE term raises the PSNR, an MSE measure, by ~0.6 dB at equal
time on Fashion-MNIST). SD-VAE (LDM) uses the same KL weight 1e-6 but on *sums* (KL summed over the latent
elements, the L1 + LPIPS reconstruction term summed over the pixels); per element that is
β·(c·h·w)/(C·H·W) = 1e-6/48 for SD-VAE, so β = 1e-6 on means here regularises ~48× more strongly
relative to the reconstruction term (still far too little to limit the reconstructions: it keeps σ from
collapsing and μ bounded). No perceptual or adversarial loss: on 28×28 gray images L1 + MSE
reconstructs well, and the point is a small VAE of diffusers' class that runs on a CPU.

**Step**: lr from :func:`lr_at` (linear warm-up, cosine to 0), AdamW, gradient norm clipped, then the EMA
(:class:`deltafm.train.ema.EMA`, half-life in images with a ramp-up) moves toward the weights.

**State** (:meth:`Trainer.state`): everything a bit-exact resume needs, stored with
:mod:`deltafm.train.checkpoint` (model and EMA in safetensors; optimizer moments, sampler position, every
random stream (:func:`deltafm.train.state.capture_rng`: torch, numpy, python, the posterior generator),
step, images seen, the log so far in ``state.safetensors`` / ``state.json``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltafm.data.sampler import EpochBatchSampler
from deltafm.errors import UserError
from deltafm.pixels import uint8_to_model
from deltafm.seeding import derive_seed, make_generator
from deltafm.train.checkpoint import load_checkpoint
from deltafm.train.ema import EMA
from deltafm.train.state import capture_rng, restore_rng

from .autoencoder_config import RESUME_KEYS, AutoencoderSettings, TrainAutoencoderError, vae_config
from .autoencoder_data import Fitted

__all__ = ["FORMAT", "LossParts", "Trainer", "autoencoder_loss", "build_trainer", "kl_per_element", "lr_at",
           "new_autoencoder"]

#: the ``format`` key of a train-autoencoder checkpoint's state
FORMAT = "deltafm.train-autoencoder"


def kl_per_element(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Mean over all elements of KL(N(μ, σ²) ‖ N(0, 1)) = ½ (μ² + σ² − 1 − log σ²), σ² = exp(logvar)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


@dataclass
class LossParts:
    """The loss and its terms (0-d tensors): L = l1_weight·l1 + mse_weight·mse + kl_weight·kl."""

    loss: torch.Tensor
    l1: torch.Tensor
    mse: torch.Tensor
    kl: torch.Tensor


def autoencoder_loss(vae: nn.Module, x: torch.Tensor, s: AutoencoderSettings,
                     generator: torch.Generator) -> tuple[LossParts, torch.Tensor]:
    """The loss of the module docstring for images ``x`` in [−1, 1]; also returns x̂."""
    post = vae.encode(x).latent_dist
    eps = torch.randn(post.mean.shape, generator=generator, device=post.mean.device, dtype=post.mean.dtype)
    z = post.mean + post.std * eps
    rec = vae.decode(z).sample
    diff = rec - x
    l1, mse = diff.abs().mean(), diff.pow(2).mean()
    kl = kl_per_element(post.mean, post.logvar)
    return LossParts(s.l1 * l1 + s.mse * mse + s.kl_weight * kl, l1, mse, kl), rec


def lr_at(step: int, s: AutoencoderSettings) -> float:
    """Learning rate of step ``step`` (0-based): lr·(step + 1)/W for step < W (W = warmup), then
    lr·½(1 + cos(π (step − W)/(T − W))) down to 0 at T = steps."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    span = max(1, s.steps - s.warmup)
    return s.lr * 0.5 * (1.0 + math.cos(math.pi * min(step - s.warmup, span) / span))


def new_autoencoder(config: dict[str, Any]) -> nn.Module:
    """A fresh ``diffusers.AutoencoderKL`` (weights from torch's global generator)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError("train-autoencoder needs the package diffusers: pip install 'deltafm[vae]'") from None
    return AutoencoderKL(**config)


@dataclass
class Trainer:
    """The mutable state of a run: model, EMA, optimizer, data order, posterior generator, progress (steps,
    images, wall seconds of the steps over all sessions), log."""

    s: AutoencoderSettings
    fitted: Fitted
    device: torch.device
    config: dict[str, Any]
    model: nn.Module
    ema: EMA
    opt: torch.optim.Optimizer
    sampler: EpochBatchSampler
    gen: torch.Generator
    step: int = 0
    images_seen: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)

    def take_step(self, x: torch.Tensor) -> dict[str, float]:
        """One optimizer step on the batch ``x`` (model space); the step's numbers (one host sync).
        ``train_psnr_db`` = 10 log₁₀(2² / mean (x̂ − x)²) of the batch (range 2, sampled z, unquantised)."""
        s = self.s
        lr = lr_at(self.step, s)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.model.train()
        parts, _ = autoencoder_loss(self.model, x, s, self.gen)
        self.opt.zero_grad(set_to_none=True)
        parts.loss.backward()
        loss, l1, mse, kl = torch.stack([parts.loss, parts.l1, parts.mse, parts.kl]).detach().tolist()
        if not math.isfinite(loss):
            raise TrainAutoencoderError(f"the loss is {loss} at step {self.step + 1}: the training diverged; "
                                        "lower --lr or --grad-clip (the checkpoints written so far are kept)")
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        self.opt.step()
        self.step += 1
        self.images_seen += int(x.shape[0])
        self.ema.update(self.model, int(x.shape[0]), self.images_seen)
        return dict(loss=loss, l1=l1, mse=mse, kl=kl, lr=lr, train_psnr_db=10.0 * math.log10(4.0 / max(mse, 1e-20)))

    def batch(self, it: Any) -> torch.Tensor:
        """The next training batch (model space, on the device) from the sampler iterator ``it``."""
        return uint8_to_model(self.fitted.train[next(it)]).to(self.device)

    def state(self, reason: str) -> dict[str, Any]:
        """The checkpoint state (see the module docstring)."""
        return {"format": FORMAT, "version": 1, "step": self.step, "images_seen": self.images_seen,
                "seconds": self.seconds,
                "settings": self.s.to_dict(), "vae_config": self.config, "optimizer": self.opt.state_dict(),
                "sampler": self.sampler.state_dict(), "rng": capture_rng(self.gen, self.device),
                "history": self.history, "evals": self.evals, "reason": reason}

    def restore(self, path: Path) -> None:
        """Continue from the checkpoint folder ``path`` (same settings required)."""
        ck = load_checkpoint(path)
        st = ck.state
        if st.get("format") != FORMAT or ck.ema is None:
            raise TrainAutoencoderError(f"{path} is not a checkpoint of deltafm train-autoencoder; choose "
                                        "another --out")
        saved = st.get("settings") or {}
        now = self.s.resume_view()
        diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now[k]!r}"
                for k in RESUME_KEYS if saved.get(k) != now[k]]
        if diff:
            raise TrainAutoencoderError(f"--resume auto: {path.parent.parent} was trained with other settings ("
                                        f"{'; '.join(diff)}); pass the run's settings or choose another --out")
        self.model.load_state_dict(ck.model)
        self.ema.load_state_dict(ck.ema)
        self.opt.load_state_dict(st["optimizer"])
        self.sampler.load_state_dict(st["sampler"])
        restore_rng(st["rng"], self.gen, self.device)
        self.step, self.images_seen = int(st["step"]), int(st["images_seen"])
        self.history, self.evals = list(st.get("history") or []), list(st.get("evals") or [])
        self.seconds = float(st.get("seconds", 0.0))


def build_trainer(s: AutoencoderSettings, fitted: Fitted, device: torch.device) -> Trainer:
    """A fresh run: weights from ``derive_seed(seed, 0, "autoencoder-init")``, data order and posterior draws
    from their own seeded streams."""
    config = vae_config(s, fitted.image_size, fitted.channels)
    torch.manual_seed(derive_seed(s.seed, 0, "autoencoder-init"))
    model = new_autoencoder(config).to(device)
    ema = EMA(model, decay=None, halflife_images=s.ema_halflife, rampup=s.ema_rampup or None)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.999), weight_decay=s.weight_decay)
    sampler = EpochBatchSampler(int(fitted.train.shape[0]), s.batch_size, derive_seed(s.seed, 0, "autoencoder-data"))
    gen = make_generator(s.seed, 0, "autoencoder-posterior", device)
    return Trainer(s, fitted, device, config, model, ema, opt, sampler, gen)
