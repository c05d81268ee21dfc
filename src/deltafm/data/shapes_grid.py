"""A PNG grid of images with their captions (or prompts) as titles; matplotlib, imported when called."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence

import numpy as np

__all__ = ["save_captioned_grid"]


def save_captioned_grid(images: np.ndarray, captions: Sequence[str], path: str | os.PathLike, ncols: int = 8,
                        cell_inches: float = 1.6, wrap: int = 26, dpi: int = 100) -> None:
    """Write ``images`` (uint8 (N, C, H, W), C = 1 or 3, channel first as in deltafm) in a grid of ``ncols``
    columns to ``path`` (PNG), each under its caption wrapped at ``wrap`` characters. Pixels are shown
    unscaled in value and enlarged without interpolation."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, 1 or 3, H, W), got {images.dtype} {images.shape}")
    if len(captions) != len(images) or not len(images):
        raise ValueError(f"need one caption per image and at least one image, got {len(captions)} for {len(images)}")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    from matplotlib.figure import Figure

    titles = [textwrap.fill(c, wrap) for c in captions]
    lines = max(t.count("\n") + 1 for t in titles)
    ncols = min(ncols, len(images))
    nrows = -(-len(images) // ncols)
    title_h, pad = 0.13 * lines + 0.05, 0.05
    cell_h = cell_inches + title_h
    width, height = ncols * cell_inches, nrows * cell_h
    fig = Figure(figsize=(width, height), dpi=dpi)
    side = cell_inches - 2 * pad
    for k, (img, title) in enumerate(zip(images, titles)):
        row, col = divmod(k, ncols)
        left, bottom = col * cell_inches + pad, height - (row + 1) * cell_h + pad
        ax = fig.add_axes((left / width, bottom / height, side / width, side / height))
        shown = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        ax.imshow(shown, cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title, fontsize=7, pad=2)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.savefig(os.fspath(path), format="png", dpi=dpi, facecolor="white")
