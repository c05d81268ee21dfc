"""Autoencoders through diffusers: load a KL autoencoder, encode images to posterior moments, decode latents.

The field's latent models (SiT/REPA on ImageNet with SD-VAE, SD3/FLUX) use ``diffusers.AutoencoderKL``.
Its encoder gives a diagonal Gaussian posterior q(z | x) = N(μ(x), σ(x)²); training data are stored as
(μ, σ) and a fresh z = μ + σ·ε is drawn per step. The model works in the scaled space

    z' = (z − b) · s            SD-VAE ft-EMA/ft-MSE: s = 0.18215, b = 0;  FLUX: s = 0.3611, b = 0.1159

with s = ``config.scaling_factor`` and b = ``config.shift_factor`` (0 when absent), unless overridden.
Decoding inverts it: x = D(z' / s + b), clipped to [−1, 1].

A VAE is named by its *source* (a local folder written by ``save_pretrained``, or a hub id when online;
nothing is downloaded here unless the hub is reachable) and identified by a content hash of its config and
weights (:attr:`Autoencoder.identity`), which latent shards record so that shards of two VAEs never mix and
a checkpoint is decoded with the VAE it was trained on. diffusers is imported only when a VAE is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltafm.errors import UserError
from deltafm.hub import looks_like_hub_id, read_config, require_weights

__all__ = ["AutoencoderError", "Autoencoder", "load_autoencoder", "vae_identity", "check_vae_folder", "split_source",
           "looks_like_hub_id"]

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class AutoencoderError(UserError, ValueError):
    """A VAE cannot be loaded or used as asked (not a diffusers AutoencoderKL folder, unreachable hub id,
    missing package, wrong identity); the message names the source and the fix."""


def check_vae_folder(folder: Path) -> dict[str, Any]:
    """The config of a diffusers ``AutoencoderKL`` folder, or an :class:`AutoencoderError` saying why not."""
    cfg_path = folder / "config.json"
    cfg = read_config(folder, AutoencoderError, f"{folder} is not a diffusers VAE folder: no config.json. Pass the "
                      "folder written by AutoencoderKL.save_pretrained (e.g. sd-vae-ft-ema, or a pipeline's vae/ "
                      "subfolder: --vae-subfolder vae)")
    if not isinstance(cfg, dict) or cfg.get("_class_name") != "AutoencoderKL":
        found = cfg.get("_class_name") if isinstance(cfg, dict) else type(cfg).__name__
        raise AutoencoderError(
            f"{cfg_path}: _class_name is {found!r}, expected 'AutoencoderKL' (deltafm loads KL autoencoders: "
            "SD-VAE, SD3/FLUX VAEs, or one from `deltafm train-autoencoder`)"
        )
    require_weights(folder, AutoencoderError, _WEIGHT_FILES)
    return cfg


def vae_identity(vae: nn.Module) -> str:
    """``AutoencoderKL:<16 hex>``: a SHA-256 over the config (sorted JSON, without diffusers' bookkeeping
    keys) and every parameter and buffer (name, dtype, shape, bytes). Equal for the same weights however
    they were loaded; different when any weight differs."""
    h = hashlib.sha256()
    cfg = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(vae.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"{type(vae).__name__}:{h.hexdigest()[:16]}"


@dataclass
class Autoencoder:
    """A loaded KL autoencoder with its latent scale and shift.

    Attributes:
        vae: the ``diffusers.AutoencoderKL`` (eval mode, no gradients).
        source: where it was loaded from (folder or hub id), recorded for later decoding.
        scale_factor, shift_factor: model space z' = (z − shift) · scale.
        identity: :func:`vae_identity` of the weights.
    """

    vae: nn.Module
    source: str
    scale_factor: float
    shift_factor: float
    identity: str

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels)

    @property
    def downsample(self) -> int:
        """Spatial downsampling factor of the encoder: 2^(number of blocks − 1) (SD-VAE: 8)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, H, W) of the latents of ``image_size`` × ``image_size`` images."""
        if image_size % self.downsample:
            raise AutoencoderError(f"image size {image_size} is not a multiple of the VAE's downsampling "
                                   f"factor {self.downsample}")
        side = image_size // self.downsample
        return self.latent_channels, side, side

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (μ, σ) of raw latents z for images in [−1, 1], (B, C_img, H, W); float32 on the VAE's device."""
        if images.ndim != 4 or images.shape[1] != self.image_channels:
            raise AutoencoderError(f"images must be (B, {self.image_channels}, H, W), got {tuple(images.shape)}")
        post = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        return post.mean.float(), post.std.float()

    def to_model(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents → model space: (z − shift) · scale."""
        return (z - self.shift_factor) * self.scale_factor

    def from_model(self, z_model: torch.Tensor) -> torch.Tensor:
        """Model space → raw latents: z' / scale + shift."""
        return z_model / self.scale_factor + self.shift_factor

    @torch.no_grad()
    def decode(self, z_model: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Model-space latents (B, C, h, w) → images in [−1, 1], float32 on the CPU, decoded in chunks."""
        if z_model.ndim != 4 or z_model.shape[1] != self.latent_channels:
            raise AutoencoderError(f"latents must be (B, {self.latent_channels}, h, w), got {tuple(z_model.shape)}")
        out = []
        for chunk in z_model.split(max(1, batch_size)):
            z = self.from_model(chunk.to(self.device, torch.float32)).to(self.dtype)
            out.append(self.vae.decode(z).sample.float().clamp(-1, 1).cpu())
        return torch.cat(out) if out else z_model.new_zeros((0, self.image_channels, 0, 0))


def _import_autoencoder_kl() -> Any:
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise AutoencoderError(
            "VAE support needs the package diffusers: pip install 'deltafm[vae]' (or pip install diffusers)"
        ) from None
    return AutoencoderKL


def _from_pretrained(cls: Any, source: str, subfolder: str | None, dtype: torch.dtype) -> nn.Module:
    folder = Path(source) / subfolder if subfolder else Path(source)
    if Path(source).exists():
        check_vae_folder(folder)
        return cls.from_pretrained(str(folder), torch_dtype=dtype, low_cpu_mem_usage=False)
    if not looks_like_hub_id(source):
        raise AutoencoderError(f"VAE {source!r}: no such folder (and not a hub id like 'stabilityai/sd-vae-ft-ema')")
    try:
        return cls.from_pretrained(source, subfolder=subfolder, torch_dtype=dtype, low_cpu_mem_usage=False)
    except Exception as e:  # hub errors come in many classes (offline, 404, gated, bad files)
        raise AutoencoderError(
            f"VAE {source!r} is not a local folder and could not be fetched from the hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). On a machine with internet run "
            f"`huggingface-cli download {source} --local-dir DIR` and pass --vae DIR"
        ) from None


def split_source(source: str, subfolder: str | None = None) -> tuple[str, str | None]:
    """``"org/name:vae"`` (how :attr:`Autoencoder.source` records a hub id with a subfolder) →
    ``("org/name", "vae")``; anything else, or an explicit ``subfolder``, is returned as given."""
    if subfolder is None and not Path(source).exists() and ":" in source:
        repo, _, sub = source.partition(":")
        if looks_like_hub_id(repo) and sub:
            return repo, sub
    return source, subfolder


def load_autoencoder(
    source: str | os.PathLike,
    *,
    subfolder: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    scale_factor: float | None = None,
    shift_factor: float | None = None,
    expect_identity: str | None = None,
) -> Autoencoder:
    """Load a ``diffusers.AutoencoderKL`` from a local folder (or a hub id when the hub is reachable).

    Args:
        source: folder written by ``save_pretrained`` (``config.json`` + weights), or a hub id.
        subfolder: e.g. ``"vae"`` for a full pipeline folder (SD3, FLUX).
        device, dtype: where and in which precision the VAE runs.
        scale_factor, shift_factor: override the config's ``scaling_factor`` / ``shift_factor``.
        expect_identity: when given, the loaded weights must have this :func:`vae_identity` (the one
            recorded in latent shards or a checkpoint); otherwise an :class:`AutoencoderError`.

    Raises:
        AutoencoderError: not a diffusers AutoencoderKL folder, unreachable hub id, diffusers missing,
            non-positive scale, or a different identity than expected.
    """
    cls = _import_autoencoder_kl()
    source, subfolder = split_source(str(source), subfolder)
    vae = _from_pretrained(cls, source, subfolder, dtype)
    vae.eval().requires_grad_(False)
    vae.to(device)
    cfg = vae.config
    scale = float(scale_factor if scale_factor is not None else getattr(cfg, "scaling_factor", 1.0) or 1.0)
    shift = float(shift_factor if shift_factor is not None else (getattr(cfg, "shift_factor", None) or 0.0))
    if not (math.isfinite(scale) and scale > 0) or not math.isfinite(shift):
        raise AutoencoderError(f"VAE {source}: scale {scale} must be finite and > 0, shift {shift} finite")
    identity = vae_identity(vae)
    if expect_identity is not None and identity != expect_identity:
        raise AutoencoderError(
            f"VAE {source} has identity {identity}, but the latents were made with {expect_identity}; "
            "decode with the VAE that encoded them (pass its folder with --vae)"
        )
    src = str(Path(source).resolve()) if Path(source).exists() else str(source)
    if subfolder:
        src = str(Path(src) / subfolder) if Path(source).exists() else f"{src}:{subfolder}"
    return Autoencoder(vae, src, scale, shift, identity)
