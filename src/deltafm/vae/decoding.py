"""Which VAE decodes a latent model's samples: the one owner of that decision.

A latent dataset records its VAE in the shard metadata (``vae_source``: where it was loaded from;
``vae``: its :func:`~deltafm.vae.autoencoder.vae_identity`); training copies both into the checkpoint's
data record. Decoding then uses, in this order:

1. an explicit override (``deltafm sample --vae DIR``, config ``sample.vae``): it must have the recorded
   identity when one is recorded, since decoding with another VAE gives wrong images silently;
2. the recorded source, checked against the recorded identity;
3. nothing: :func:`find_decoder` says why (no VAE recorded, source gone), and the caller decides (training
   skips the grids with one warning; ``deltafm sample`` stops unless ``--no-decode``).

Decoded images are x = D(z'/s + b) clipped to [−1, 1], then the package's one pixel map to uint8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deltafm.pixels import to_uint8_nhwc
from deltafm.vae.autoencoder import Autoencoder, AutoencoderError, load_autoencoder, looks_like_hub_id

__all__ = ["find_decoder", "decode_uint8"]

_CACHE: dict[tuple[str, str | None, str], Autoencoder] = {}


def find_decoder(
    source: str | None,
    identity: str | None,
    override: str | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Autoencoder | None, str]:
    """The VAE to decode with, or ``(None, why)``.

    Args:
        source, identity: what the data record holds (``vae_source``, ``vae``), either may be None.
        override: a VAE folder or hub id given by the user; wins over ``source`` but must match ``identity``.
        device: where the VAE runs.

    Raises:
        AutoencoderError: the override (or the recorded source) loads but has another identity, or the
            override cannot be loaded at all (the user asked for it explicitly).
    """
    pick = override if override is not None else source
    if pick is None:
        return None, "the latents record no VAE; pass the VAE that encoded them (--vae DIR / sample.vae)"
    if override is None and not Path(pick).exists() and not looks_like_hub_id(pick):
        return None, f"the VAE recorded with the latents, {pick}, is not here; pass its folder (--vae DIR / sample.vae)"
    key = (str(pick), identity, str(device))
    if key not in _CACHE:
        try:
            _CACHE[key] = load_autoencoder(pick, device=device, expect_identity=identity)
        except AutoencoderError as e:
            if override is None and "identity" not in str(e):
                return None, f"the VAE recorded with the latents cannot be loaded ({e})"
            raise
    return _CACHE[key], ""



@torch.no_grad()
def decode_uint8(ae: Autoencoder, z_model: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Model-space latents (B, C, h, w) → uint8 images (B, H, W, C_img) on the CPU."""
    return to_uint8_nhwc(ae.decode(z_model, batch_size=batch_size))
