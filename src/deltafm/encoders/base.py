"""The frozen image encoder of REPA: images in [−1, 1] → patch tokens on a requested grid.

REPA (Yu et al., 2025) aligns a SiT's hidden tokens with the patch tokens y ∈ R^{N×D_e} of a frozen,
pretrained encoder (DINOv2) of the clean image. :class:`ImageEncoder` is that encoder behind one call,
``tokens = enc(images, grid=(gh, gw))``, doing REPA's preprocessing first. For images x ∈ [−1, 1]^{B×C×H×W}:

    u = (x + 1) / 2                                  pixels in [0, 1]; C = 1 is repeated to 3 channels
    v_c = (u_c − μ_c) / σ_c                          per-channel normalisation (DINOv2: ImageNet μ, σ)
    w = bicubic(v, (gh·p, gw·p))                     F.interpolate(mode="bicubic", align_corners=False),
                                                     skipped when v is already that size
    y = encoder(w)  ∈ R^{B × gh·gw × D_e}            float32 patch tokens, no gradient

with p the encoder's patch size, so that its token grid is exactly (gh, gw): REPA's rule, e.g. 256-px
images and a SiT/2 grid of 16 × 16 run DINOv2-B/14 at 16·14 = 224 px (512 px, grid 32: 448 px). An encoder
of a fixed input size (``patch_size`` None, ``resolution`` R) sees bicubic(v, R) and its token grid is
resampled to (gh, gw) by :func:`deltafm.alignment.match_token_grid` (bilinear on the 2-D grid).

The encoder is frozen: no parameter requires a gradient, it stays in eval mode (``train()`` leaves it
there) and ``forward`` runs under ``torch.no_grad()``. It runs in whatever precision the caller's autocast
gives it; the tokens come back as float32.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltafm.alignment import match_token_grid
from deltafm.errors import UserError

__all__ = ["EncoderError", "ImageEncoder", "IMAGENET_MEAN", "IMAGENET_STD", "check_grid", "check_images",
           "check_mean_std", "encoder_name", "preprocess", "state_digest"]

#: ImageNet's per-channel mean and std of pixels in [0, 1]: DINOv2's (and REPA's) normalisation
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderError(UserError, ValueError):
    """An encoder cannot be loaded or used as asked (not an encoder folder, another model type, missing
    weights or package, a bad grid or image batch); the message names the input and the fix."""


def encoder_name(text: str) -> str:
    """A short name from a folder name: characters other than ``[A-Za-z0-9._-]`` become ``-``, leading and
    trailing dots and dashes are dropped (``"encoder"`` when nothing is left). Used as the tensor key
    ``features.<name>`` in latent shards."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip(".-") or "encoder"


def check_grid(grid: Sequence[int] | int) -> tuple[int, int]:
    """(gh, gw) as ints, both ≥ 1 (an int g means (g, g))."""
    if isinstance(grid, int):
        grid = (grid, grid)
    try:
        gh, gw = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise EncoderError(f"grid must be (rows, cols) of token counts, got {grid!r}") from None
    if gh < 1 or gw < 1:
        raise EncoderError(f"grid must have positive sides, got ({gh}, {gw})")
    return gh, gw


def check_images(images: Tensor) -> None:
    """Images must be a float (B, C, H, W) tensor with C ∈ {1, 3} (values in [−1, 1])."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise EncoderError(f"images must be a (B, C, H, W) tensor in [-1, 1], got {shape}")
    if images.shape[1] not in (1, 3):
        raise EncoderError(f"images must have 1 or 3 channels, got {images.shape[1]} (shape {tuple(images.shape)})")
    if not images.is_floating_point():
        raise EncoderError(f"images must be float in [-1, 1], got {images.dtype} (map uint8 p to p / 127.5 - 1)")


def check_mean_std(mean: Iterable[float], std: Iterable[float], where: str) -> tuple[tuple[float, ...], ...]:
    """The per-channel (mean, std) as 3-tuples of floats (one value is used for all three channels);
    std must be > 0 and all values finite."""
    out = []
    for label, values in (("mean", mean), ("std", std)):
        try:
            v = tuple(float(x) for x in values)
        except (TypeError, ValueError):
            raise EncoderError(f"{where}: image {label} must be a list of numbers, got {values!r}") from None
        if len(v) == 1:
            v = v * 3
        if len(v) != 3 or not all(math.isfinite(x) for x in v):
            raise EncoderError(f"{where}: image {label} must be 3 finite numbers (one per RGB channel), got {list(v)}")
        if label == "std" and min(v) <= 0:
            raise EncoderError(f"{where}: image std must be > 0, got {list(v)}")
        out.append(v)
    return out[0], out[1]


def preprocess(images: Tensor, mean: Tensor, std: Tensor, size: tuple[int, int] | None) -> Tensor:
    """REPA's preprocessing (module docstring): [−1, 1] → [0, 1], gray → RGB, (u − μ) / σ, bicubic resize to
    ``size`` = (H', W') unless already that size (None: no resize). ``mean``/``std`` are (1, 3, 1, 1)."""
    x = (images.float() + 1) / 2
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = (x - mean) / std
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False)
    return x


def state_digest(kind: str, meta: dict[str, Any], state: dict[str, Tensor]) -> str:
    """``<kind>:<16 hex>``: a SHA-256 over ``meta`` (sorted JSON) and every tensor of ``state`` (name,
    dtype, shape, bytes), in name order. Equal for equal content however it was loaded."""
    h = hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, t in sorted(state.items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"{kind}:{h.hexdigest()[:16]}"


class ImageEncoder(nn.Module):
    """A frozen encoder: ``forward(images, grid)`` → (B, gh·gw, D_e) float32 patch tokens.

    Subclasses implement :meth:`encode` (preprocessed pixels (B, 3, H', W') → tokens (B, N, D_e)) and set
    ``identity`` (see :func:`state_digest`).

    Attributes:
        name: short name ([A-Za-z0-9._-]), the key ``features.<name>`` of stored features.
        identity: content hash of the weights, config and normalisation, ``<class>:<16 hex>``.
        embed_dim: D_e, the width of the tokens.
        patch_size: p (DINOv2: 14); None for an encoder of fixed input size ``resolution``.
        resolution: (H, W) input of a fixed-size encoder; None for a patch encoder.
        mean, std: (1, 3, 1, 1) buffers of the normalisation (not saved in a state dict).
    """

    identity: str

    def __init__(self, name: str, embed_dim: int, mean: Iterable[float], std: Iterable[float],
                 patch_size: int | None = None, resolution: int | Sequence[int] | None = None) -> None:
        super().__init__()
        if (patch_size is None) == (resolution is None):
            raise EncoderError(f"encoder {name!r}: give exactly one of patch_size (a patch encoder) or resolution "
                               "(a fixed input size)")
        if patch_size is not None and int(patch_size) < 1:
            raise EncoderError(f"encoder {name!r}: patch_size must be >= 1, got {patch_size}")
        if int(embed_dim) < 1:
            raise EncoderError(f"encoder {name!r}: embed_dim must be >= 1, got {embed_dim}")
        mean, std = check_mean_std(mean, std, f"encoder {name!r}")
        self.name = encoder_name(name)
        self.embed_dim = int(embed_dim)
        self.patch_size = int(patch_size) if patch_size is not None else None
        self.resolution = check_grid(resolution) if resolution is not None else None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def freeze(self) -> ImageEncoder:
        """No gradients, eval mode (called by the subclasses once their modules exist)."""
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> ImageEncoder:
        """Frozen: stays in eval mode whatever ``mode`` is."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def image_mean(self) -> tuple[float, ...]:
        return tuple(self.mean.flatten().tolist())

    @property
    def image_std(self) -> tuple[float, ...]:
        return tuple(self.std.flatten().tolist())

    def input_size(self, grid: Sequence[int] | int) -> tuple[int, int]:
        """The side (H', W') the encoder sees for ``grid``: (gh·p, gw·p), or the fixed ``resolution``."""
        gh, gw = check_grid(grid)
        if self.patch_size is not None:
            return gh * self.patch_size, gw * self.patch_size
        assert self.resolution is not None
        return self.resolution

    def encode(self, pixels: Tensor) -> Tensor:
        """Preprocessed pixels (B, 3, H', W') → tokens (B, N, D_e); implemented by subclasses."""
        raise NotImplementedError

    def forward(self, images: Tensor, grid: Sequence[int] | int) -> Tensor:
        """Images (B, C, H, W) in [−1, 1], C ∈ {1, 3} → (B, gh·gw, D_e) float32 patch tokens (no gradient)."""
        check_images(images)
        gh, gw = check_grid(grid)
        with torch.no_grad():
            x = preprocess(images.to(self.device), self.mean, self.std, self.input_size((gh, gw)))
            tokens = self.encode(x.to(self._input_dtype()))
            self._check_tokens(tokens, images.shape[0])
            if self.patch_size is None:
                tokens = self._to_grid(tokens, (gh, gw))
            elif tokens.shape[1] != gh * gw:
                raise EncoderError(f"encoder {self.name!r} returned {tokens.shape[1]} tokens for a {gh}x{gw} grid "
                                   f"({gh * self.patch_size}x{gw * self.patch_size} px, patch {self.patch_size}); "
                                   "is patch_size right (and are class / register tokens dropped)?")
            return tokens.float()

    def _input_dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def _check_tokens(self, tokens: Any, batch: int) -> None:
        if not isinstance(tokens, Tensor) or tokens.ndim != 3 or tokens.shape[0] != batch \
                or tokens.shape[2] != self.embed_dim:
            shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise EncoderError(f"encoder {self.name!r} returned {shape}; expected tokens ({batch}, N, "
                               f"{self.embed_dim}) = (batch, tokens, embed_dim)")

    def _to_grid(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        try:
            return match_token_grid(tokens, grid)
        except ValueError as e:
            raise EncoderError(f"encoder {self.name!r}: {e}") from None

    def extra_repr(self) -> str:
        where = f"patch_size={self.patch_size}" if self.patch_size else f"resolution={self.resolution}"
        return f"name={self.name!r}, embed_dim={self.embed_dim}, {where}, identity={getattr(self, 'identity', '?')}"
