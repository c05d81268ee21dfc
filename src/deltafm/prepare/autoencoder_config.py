"""Settings of ``deltafm train-autoencoder``: one dataclass, its checks, and the diffusers config it makes.

The model is diffusers' own ``AutoencoderKL`` with L = ``len(block_channels)`` levels: L
``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` blocks, each of ``layers_per_block`` ResNet blocks (the
decoder has one more per block, as in SD-VAE), GroupNorm with ``norm_groups`` groups, SiLU, and L − 1
stride-2 downsamplings, so an S × S image becomes a ``latent_channels`` × S/f × S/f latent with
f = 2^(L − 1). SD-VAE is the same class with ``block_channels = 128,256,512,512``, ``layers_per_block = 2``,
``latent_channels = 4`` (f = 8) and an attention layer in the middle block (``mid_attention``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from deltafm.errors import UserError

from .settings_checks import check_device_name, check_ranges

__all__ = ["TrainAutoencoderError", "AutoencoderSettings", "FITS", "RESUME_KEYS", "check_settings", "vae_config",
           "downsample_of"]


class TrainAutoencoderError(UserError, ValueError):
    """``deltafm train-autoencoder`` cannot run as asked (an option out of range, an image size the model
    cannot take, an output folder that already holds a finished run); the message names the fix."""


@dataclass
class AutoencoderSettings:
    """Everything a run of ``deltafm train-autoencoder`` depends on (the CLI's options, resolved).

    Data: ``dataset``/``root``/``max_items`` as in :func:`deltafm.data.load_dataset`; ``heldout`` items
    of the test split (or carved from the training split when there is none) for PSNR / rFD;
    ``image_size`` (None: the smallest multiple of twice the downsampling factor ≥ the dataset's side, an
    even latent side) reached by
    ``fit`` = ``pad`` (edge-replicate padding, centred), ``resize`` (bilinear, antialiased) or ``adm`` (the
    centre crop of ``deltafm prepare-latents``);
    ``channels`` (None: the dataset's; 3 on a gray dataset replicates the gray channel).

    Loss: ``l1``·mean|x̂ − x| + ``mse``·mean (x̂ − x)² + ``kl_weight``·mean KL (see
    :func:`deltafm.prepare.autoencoder_train.kl_per_element`).

    Optimisation: AdamW(``lr``, betas (0.9, 0.999), ``weight_decay``), linear warm-up over ``warmup``
    steps then cosine decay to 0 at ``steps``; gradient norm clipped to ``grad_clip`` (0: off); EMA with a
    half-life of ``ema_halflife`` images, capped at ``ema_rampup`` × images seen (0: no cap).
    """

    dataset: str = "fashion-mnist"
    root: str | None = None
    max_items: int | None = None
    heldout: int = 2000
    image_size: int | None = None
    fit: str = "pad"
    channels: int | None = None
    block_channels: tuple[int, ...] = (16, 32, 32)
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_groups: int = 16
    mid_attention: bool = False
    l1: float = 1.0
    mse: float = 1.0
    kl_weight: float = 1e-6
    steps: int = 3000
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_halflife: float = 5000.0
    ema_rampup: float = 0.1
    seed: int = 0
    checkpoint_every: int = 500
    keep_last: int = 2
    grid_every: int = 500
    log_every: int = 50
    scale_items: int = 5000
    shift: bool = False
    extractor: str | None = None
    device: str = "auto"
    threads: int | None = None
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["block_channels"] = list(self.block_channels)
        return d

    def resume_view(self) -> dict[str, Any]:
        """The settings that decide the weights; a resumed run must have the same ones."""
        d = self.to_dict()
        return {k: d[k] for k in RESUME_KEYS}

    @property
    def downsample(self) -> int:
        return downsample_of(self.block_channels)


#: how images reach the model size (see :mod:`deltafm.prepare.autoencoder_data`)
FITS = ("pad", "resize", "adm")
#: settings a resume must not change (the others: when to checkpoint / draw / log, where to run, final eval)
RESUME_KEYS = ("dataset", "root", "max_items", "heldout", "image_size", "fit", "channels", "block_channels",
               "latent_channels", "layers_per_block", "norm_groups", "mid_attention", "l1", "mse", "kl_weight",
               "steps", "batch_size", "lr", "warmup", "weight_decay", "grad_clip", "ema_halflife", "ema_rampup",
               "seed")
assert set(RESUME_KEYS) <= {f.name for f in fields(AutoencoderSettings)}


def downsample_of(block_channels: tuple[int, ...]) -> int:
    """Spatial downsampling factor f = 2^(levels − 1) of an AutoencoderKL with these blocks."""
    return 2 ** (len(block_channels) - 1)


def _bad(msg: str) -> TrainAutoencoderError:
    return TrainAutoencoderError(msg)


def _check_numbers(s: AutoencoderSettings) -> None:
    check_ranges(TrainAutoencoderError,
                 positive=dict(latent_channels=s.latent_channels, layers_per_block=s.layers_per_block,
                               norm_groups=s.norm_groups, steps=s.steps, batch_size=s.batch_size,
                               checkpoint_every=s.checkpoint_every, grid_every=s.grid_every, log_every=s.log_every,
                               scale_items=s.scale_items, keep_last=s.keep_last),
                 optional_positive=dict(max_items=s.max_items, threads=s.threads))
    if s.heldout < 2:
        raise _bad(f"--heldout must be >= 2 (a Fréchet distance needs two images), got {s.heldout}")
    check_ranges(TrainAutoencoderError,
                 nonnegative=dict(l1=s.l1, mse=s.mse, kl_weight=s.kl_weight, warmup=s.warmup,
                                  weight_decay=s.weight_decay, grad_clip=s.grad_clip, ema_halflife=s.ema_halflife,
                                  ema_rampup=s.ema_rampup, seed=s.seed))
    if s.l1 == 0 and s.mse == 0:
        raise _bad("--l1 and --mse are both 0: there would be no reconstruction loss")
    if not (math.isfinite(s.lr) and s.lr > 0):
        raise _bad(f"--lr must be finite and > 0, got {s.lr}")


def check_settings(s: AutoencoderSettings) -> None:
    """Refuse settings that cannot make a model (before any data is read)."""
    _check_numbers(s)
    if not s.block_channels or any(int(c) < 1 for c in s.block_channels):
        raise _bad(f"--block-channels must be positive integers, e.g. 32,64,64; got {list(s.block_channels)}")
    bad = [c for c in s.block_channels if c % s.norm_groups]
    if bad:
        raise _bad(f"--norm-groups {s.norm_groups} must divide every block's channels (GroupNorm); "
                   f"{bad} are not multiples of it")
    if s.fit not in FITS:
        raise _bad(f"--fit must be one of {', '.join(FITS)}, got {s.fit!r}")
    if s.channels not in (None, 1, 3):
        raise _bad(f"--channels must be 1 or 3, got {s.channels}")
    if s.image_size is not None:
        f = s.downsample
        if s.image_size < 1 or s.image_size % f:
            raise _bad(f"--image-size {s.image_size} is not a multiple of the downsampling factor {f} "
                       f"(2^(levels − 1) for --block-channels {','.join(map(str, s.block_channels))}); "
                       f"use e.g. {max(f, (s.image_size // f) * f)} or {(s.image_size // f + 1) * f}")
    check_device_name(s.device, TrainAutoencoderError)


def vae_config(s: AutoencoderSettings, image_size: int, channels: int) -> dict[str, Any]:
    """The ``diffusers.AutoencoderKL`` constructor arguments of these settings (``scaling_factor`` 1 and
    ``shift_factor`` None while training; the export sets the measured ones)."""
    levels = len(s.block_channels)
    return dict(in_channels=channels, out_channels=channels,
                down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                block_out_channels=[int(c) for c in s.block_channels], layers_per_block=s.layers_per_block,
                act_fn="silu", latent_channels=s.latent_channels, norm_num_groups=s.norm_groups,
                sample_size=image_size, scaling_factor=1.0, shift_factor=None,
                mid_block_add_attention=bool(s.mid_attention))
