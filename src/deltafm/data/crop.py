"""The ADM centre crop (guided-diffusion's recipe, also used by DiT, SiT and REPA to make ImageNet latents).

Given a decoded image and a target side ``size``:

1. while the shorter side is at least ``2·size``, halve both sides (integer division) with PIL's BOX
   filter (an exact 2×2 average, cheap anti-aliasing for large images);
2. scale with BICUBIC so that the shorter side is exactly ``size`` (the longer side rounds to the nearest
   integer); an image whose shorter side is already ``size`` is left as it is, one smaller than ``size``
   is *upsampled* here (allowed; ``deltafm prepare-latents`` counts and reports such images);
3. cut the centred ``size × size`` square, the offset of each side being ``(side − size) // 2``.

Colour conversion (``RGB`` for three channels, ``L`` for one; an alpha channel is dropped) comes first,
as in guided-diffusion. The result is a uint8 array (C, size, size).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["MODES", "adm_center_crop", "crop_to_array"]

#: PIL mode per channel count
MODES = {1: "L", 3: "RGB"}


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """The ``size × size`` ADM centre crop of a PIL image (see the module docstring for the three steps)."""
    from PIL import Image

    if size < 1:
        raise ValueError(f"crop size must be >= 1, got {size}")
    while min(image.size) >= 2 * size:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    new = (round(image.size[0] * scale), round(image.size[1] * scale))
    if new != image.size:
        image = image.resize(new, resample=Image.Resampling.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def crop_to_array(image: Image.Image, size: int, channels: int = 3) -> np.ndarray:
    """Convert to ``RGB`` / ``L``, ADM-crop to ``size`` and return uint8 (C, size, size)."""
    if channels not in MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image.mode != MODES[channels]:
        image = image.convert(MODES[channels])
    arr = np.asarray(adm_center_crop(image, size), dtype=np.uint8)
    return np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
