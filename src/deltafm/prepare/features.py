"""REPA extras of ``deltafm prepare-latents``: encoder patch tokens and the cropped images, per item.

With ``--encoder PATH`` (repeatable) every item also gets, in its shard, the patch tokens of the same
ADM-cropped image the VAE encoded (the mirrored image for a flipped copy), from each frozen encoder
(:func:`deltafm.encoders.load_encoder`)::

    p ∈ {0..255}^{C×S×S}  ->  x = p / 127.5 − 1              (the VAE's input, read once per batch)
    features.<name> = fp16( enc(x, grid=(G, G)) ) ∈ R^{G²×D}  G = --encoder-grid, default h // 2 for a
                                                              latent of side h (the SiT/2 token grid)

stored float16 (finite after the cast, else an :class:`~deltafm.encoders.EncoderError` naming the
encoder: |v| > 65504 overflows), with metadata ``features.<name>.identity`` / ``.grid`` / ``.dim``
(:func:`deltafm.data.latent_format.feature_metadata`). With ``--keep-images`` the uint8 crop p itself is
stored as ``images`` (so an encoder can run on the fly while training). ``<name>`` is the encoder's
(its folder name, sanitised); two encoders of one name are an error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deltafm.data.latent_format import FEATURES_PREFIX, IMAGES, feature_metadata
from deltafm.encoders import EncoderError, load_encoder

__all__ = ["Extras", "load_extras_spec"]


@dataclass
class Extras:
    """What REPA extras a prepare-latents run stores: ``encoders`` (frozen, on the run's device) at token
    ``grid`` (gh, gw), and the cropped images when ``keep_images``."""

    encoders: list[Any] = field(default_factory=list)
    grid: tuple[int, int] = (1, 1)
    keep_images: bool = False
    sources: list[str] = field(default_factory=list)  # the --encoder paths, as given

    @property
    def any(self) -> bool:
        return bool(self.encoders) or self.keep_images

    def names(self) -> list[str]:
        """The extra tensor names, e.g. ``["features.dinov2-base", "images"]``."""
        return [f"{FEATURES_PREFIX}{e.name}" for e in self.encoders] + ([IMAGES] if self.keep_images else [])

    def settings(self) -> dict[str, Any]:
        """The ``prepare.json`` entries (compared on restart): encoders (name, identity), grid, keep_images."""
        return dict(encoders=[{"name": e.name, "identity": e.identity} for e in self.encoders],
                    encoder_grid=list(self.grid) if self.encoders else None, keep_images=self.keep_images)

    def metadata(self) -> dict[str, str]:
        """Shard metadata of every encoder: ``features.<name>.identity``, ``.grid`` and ``.dim``."""
        out: dict[str, str] = {}
        for e in self.encoders:
            out.update(feature_metadata(e.name, e.identity, self.grid, e.embed_dim))
        return out

    def shapes(self, channels: int, image_size: int) -> dict[str, tuple[int, ...]]:
        """Item shape of each extra: (G², D) for features, (C, S, S) for images."""
        tokens = self.grid[0] * self.grid[1]
        out: dict[str, tuple[int, ...]] = {f"{FEATURES_PREFIX}{e.name}": (tokens, e.embed_dim) for e in self.encoders}
        if self.keep_images:
            out[IMAGES] = (channels, image_size, image_size)
        return out

    def empty(self, channels: int, image_size: int) -> dict[str, torch.Tensor]:
        """Zero-item extras (a shard whose images were all skipped)."""
        return {k: torch.empty((0, *s), dtype=torch.uint8 if k == IMAGES else torch.float16)
                for k, s in self.shapes(channels, image_size).items()}

    def compute(self, x: torch.Tensor, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The extras of one batch, on the CPU as stored: each encoder's tokens of ``x`` (the batch in
        [−1, 1], on the encoders' device) cast to float16, and ``pixels`` (uint8) when keeping images.

        Raises:
            EncoderError: an encoder returned the wrong shape, or values not finite in float16.
        """
        out: dict[str, torch.Tensor] = {}
        for e in self.encoders:
            with torch.no_grad():
                tokens = e(x, grid=self.grid)
            want = (x.shape[0], self.grid[0] * self.grid[1], e.embed_dim)
            if tuple(tokens.shape) != want:
                raise EncoderError(f"encoder {e.name!r} returned tokens {tuple(tokens.shape)}, expected {want}")
            half = tokens.detach().to("cpu", torch.float16)
            bad = ~torch.isfinite(half)
            if bool(bad.any()):
                peak = float(tokens.detach().abs().max())
                raise EncoderError(
                    f"encoder {e.name!r} ({e.identity}): {int(bad.sum())} feature value(s) are NaN or inf after the "
                    f"cast to float16 (largest |value| {peak:.4g}; float16 holds up to 65504); its features cannot "
                    "be stored: use another encoder, or leave --encoder out and run it while training (--keep-images)")
            out[f"{FEATURES_PREFIX}{e.name}"] = half
        if self.keep_images:
            out[IMAGES] = pixels.detach().to("cpu", torch.uint8)
        return out


def load_extras_spec(paths: Sequence[str] | None, grid: int | None, keep_images: bool, latent_side: int,
                     device: torch.device) -> Extras:
    """Load the ``--encoder`` folders on ``device`` and fix the token grid (``--encoder-grid`` G, default
    ``latent_side // 2``).

    Raises:
        EncoderError: a path that is not an encoder folder (the encoders package's message), two encoders
            of one name, or a grid below 1.
    """
    paths = list(paths or [])
    side = grid if grid is not None else latent_side // 2
    if paths and side < 1:
        raise EncoderError(f"the latents are {latent_side} wide: the default token grid latent side // 2 is 0; "
                           "pass --encoder-grid G")
    encoders = [load_encoder(p, device=device) for p in paths]
    seen: dict[str, str] = {}
    for p, e in zip(paths, encoders):
        if e.name in seen:
            raise EncoderError(f"--encoder {seen[e.name]} and --encoder {p} have the same name {e.name!r} (the "
                               f"folder's name, stored as features.{e.name}); rename one of the folders")
        seen[e.name] = os.fspath(p)
    return Extras(encoders, (side, side), keep_images, [os.fspath(p) for p in paths])
