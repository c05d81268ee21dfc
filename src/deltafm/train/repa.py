"""REPA targets in a training run: which encoder tokens each projector is aligned to, and where they come from.

``repa.features`` names tokens precomputed into latent shards (``prepare-latents --encoder``): the loader
reads tensor ``features.<name>`` with the batch, and tokens stored on another grid than the model's are
resampled (:func:`deltafm.alignment.match_token_grid`). ``repa.encoders`` are encoder folders
(:func:`deltafm.encoders.load_encoder`) run in the step, without gradients and under the step's autocast,
on the clean images: x itself for pixel data, the uint8 images stored beside latents
(``prepare-latents --keep-images``, tensor ``images``) for latent data, mapped to [-1, 1] as p/127.5 − 1.
The order of the targets (features first, then encoders, each in config order) is the order of the
model's projectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deltafm.alignment import match_token_grid

from .builders import SetupError
from .config import RepaConfig

__all__ = ["RepaTargets"]


@dataclass
class _Target:
    name: str
    dim: int
    encoder: nn.Module | None = None  # None: precomputed tokens read with the batch


class RepaTargets:
    """The REPA targets of a run; ``targets(x1, extras, grid)`` gives one (B, gh·gw, D_e) tensor per
    projector. Build with :meth:`from_config`."""

    def __init__(self, targets: list[_Target], images_from_extras: bool) -> None:
        self.targets = targets
        self.images_from_extras = images_from_extras

    @classmethod
    def from_config(cls, cfg: RepaConfig, dataset: Any, latent: bool, device: torch.device) -> RepaTargets | None:
        """Check ``cfg`` against the data and load the encoders (None when REPA is off). Bad input: a
        :class:`SetupError` naming what to run or change."""
        if not cfg.enabled:
            return None
        available = tuple(getattr(dataset, "extra_names", ()))
        info = getattr(dataset, "feature_info", {}) or {}
        targets = []
        for name in cfg.features:
            if f"features.{name}" not in available:
                have = sorted(n.removeprefix("features.") for n in available if n.startswith("features."))
                raise SetupError(f"repa.features names {name!r}, but the data holds no such precomputed tokens "
                                 f"(it has: {', '.join(have) or 'none'}); write them with `deltafm prepare-latents "
                                 "--encoder DIR` (the encoder folder's name is the feature name), or list the "
                                 "encoder folder in repa.encoders to run it during training")
            targets.append(_Target(name, int(info[name]["dim"])))
        needs_images = bool(cfg.encoders) and latent
        if needs_images and "images" not in available:
            raise SetupError("repa.encoders runs the encoders on the clean images, but these latent shards hold no "
                             "images: write them with `deltafm prepare-latents --keep-images`, or precompute the "
                             "tokens with `prepare-latents --encoder DIR` and name them in repa.features")
        for spec in cfg.encoders:
            enc = _load(spec).to(device)
            targets.append(_Target(spec, int(enc.embed_dim), enc))
        return cls(targets, needs_images)

    @property
    def dims(self) -> list[int]:
        """Token widths D_e, one per projector."""
        return [t.dim for t in self.targets]

    @property
    def extra_names(self) -> tuple[str, ...]:
        """The per-item tensors the loader must read with each batch."""
        names = [f"features.{t.name}" for t in self.targets if t.encoder is None]
        return tuple(names + (["images"] if self.images_from_extras else []))

    @torch.no_grad()
    def __call__(self, x1: Tensor, extras: dict[str, Tensor], grid: tuple[int, int]) -> list[Tensor]:
        images = None
        out = []
        for t in self.targets:
            if t.encoder is None:
                out.append(match_token_grid(extras[f"features.{t.name}"].to(x1.device), grid))
                continue
            if images is None:
                images = extras["images"].to(x1.device).float() / 127.5 - 1.0 if self.images_from_extras else x1
            out.append(t.encoder(images, grid=grid))
        return out


def _load(spec: str) -> nn.Module:
    try:
        from deltafm.encoders import EncoderError, load_encoder
    except ImportError as e:  # pragma: no cover - the package is part of deltafm
        raise SetupError(f"repa.encoders: cannot load the encoders package ({e})") from None
    try:
        return load_encoder(spec)
    except EncoderError as e:
        raise SetupError(f"repa.encoders: {e}") from None
