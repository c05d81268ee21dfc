"""Writing samples to disk: PNG grids and the ADM sample layout.

:func:`write_outputs` writes ``grid.png`` (one column per class), ``class_XXX.png`` per class,
``samples.npz`` in the layout of the ADM evaluation suite (``arr_0``: uint8 N×H×W×C, ``labels``: int64 N)
and ``sample.json`` (the settings, strict JSON: no NaN). Pixels come from :func:`deltafm.pixels.to_uint8_nhwc`.
The grids are drawn from the first images only (:func:`write_grids` takes a function that fetches images
by index), so ``deltafm sample`` can write them from chunks on disk (:mod:`deltafm.sample_store`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

__all__ = ["make_grid", "save_grid", "write_grids", "sample_info", "write_meta", "write_outputs"]


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile uint8 N×H×W×C images row by row into one H'×W'×C array (``ncol`` per row)."""
    n, h, w, c = images.shape
    ncol = max(1, min(ncol or math.ceil(math.sqrt(n)), n)) if n else 1
    nrow = max(1, math.ceil(n / ncol))
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def save_grid(images: np.ndarray, path: str | Path, ncol: int | None = None, min_cell: int = 32) -> Path:
    """Write a PNG grid of uint8 N×H×W×C images (1 or 3 channels); small images are enlarged (nearest)
    so that each cell is at least ``min_cell`` pixels."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h = images.shape[1]
    scale = max(1, math.ceil(min_cell / max(h, 1)))
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    grid = make_grid(images, ncol)
    c = grid.shape[2]
    if c == 1:
        img = Image.fromarray(grid[:, :, 0], mode="L")
    elif c == 3:
        img = Image.fromarray(grid, mode="RGB")
    else:
        raise ValueError(f"cannot save {c}-channel images as PNG")
    img.save(path)
    return path


def write_grids(out_dir: str | Path, take: Callable[[np.ndarray], np.ndarray],
                labels: Tensor | np.ndarray) -> dict[str, Path]:
    """Write grid.png and class_XXX.png from the first images only: ``take(indices)`` returns the uint8
    N×H×W×C images at ``indices`` (an in-memory array, or chunks on disk), so a grid never needs them all."""
    out = Path(out_dir)
    labels = np.asarray(labels, dtype=np.int64)
    paths: dict[str, Path] = {}
    present = np.unique(labels).tolist()  # sorted
    n = labels.shape[0]
    if len(present) > 1:  # one column per class, up to 10 rows
        paths["grid"] = save_grid(take(np.arange(min(n, len(present) * 10))), out / "grid.png", ncol=len(present))
    else:
        paths["grid"] = save_grid(take(np.arange(min(n, 64))), out / "grid.png")
    for k in present:
        paths[f"class_{k}"] = save_grid(take(np.flatnonzero(labels == k)[:64]), out / f"class_{k:03d}.png")
    return paths


def write_meta(path: str | Path, meta: dict[str, Any]) -> Path:
    """Write sample.json; a non-finite number is a ValueError (JSON has no NaN)."""
    path = Path(path)
    path.write_text(json.dumps(meta, indent=1, allow_nan=False))
    return path


def sample_info(meta: dict[str, Any] | None, num: int, num_classes: int,
                class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """What sample.json records: the settings ``meta``, then num, num_classes and class_names."""
    info = dict(meta or {})
    info.update(num=int(num), num_classes=num_classes, class_names=list(class_names) if class_names else None)
    return info


def write_outputs(out_dir: str | Path, images: np.ndarray, labels: Tensor | np.ndarray, num_classes: int,
                  meta: dict[str, Any] | None = None, class_names: Sequence[str] | None = None) -> dict[str, Path]:
    """Write grid.png, class_XXX.png, samples.npz (ADM layout) and sample.json from images in memory;
    returns their paths. ``deltafm sample`` writes the same files from chunks on disk."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels, dtype=np.int64)
    paths = write_grids(out, lambda idx: images[idx], labels)
    np.savez(out / "samples.npz", arr_0=images, labels=labels)
    paths["npz"] = out / "samples.npz"
    paths["meta"] = write_meta(out / "sample.json", sample_info(meta, images.shape[0], num_classes, class_names))
    return paths
