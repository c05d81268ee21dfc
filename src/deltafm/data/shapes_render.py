"""Anti-aliased rendering of coloured-shapes scenes (numpy only).

A shape of extent e is sampled at the centres (u, v) = (i + 1/2, j + 1/2) of an (e·f) × (e·f) grid
(f = the supersample factor, E = e·f) and box-filtered down to its coverage a ∈ [0, 1] per pixel: a = the
fraction of the f × f samples of the pixel that lie inside. With c = E/2 the outlines are

    circle    (u − c)² + (v − c)² ≤ c²                    square    the whole box
    triangle  |u − c| ≤ v / 2  (apex (c, 0), base y = E)   diamond   |u − c| + |v − c| ≤ c
    cross     |u − c| ≤ E/6  or  |v − c| ≤ E/6  (an upright plus of two bars of width E/3)

so every shape is exactly mirror-symmetric left-right, all but the triangle also top-bottom and about the
diagonal, and (for f ≥ 2) each touches all four sides of its box. Boxes start on whole pixels, so a depends
only on (shape, e, f) and is cached. On the black canvas an object's pixels are round(a · rgb) inside its
box and 0 elsewhere; objects never overlap, so a scene is the sum of its objects drawn alone, and the fully
covered pixels (a = 1) hold the palette colour exactly.

(Pillow's ``ImageDraw.polygon`` was the first renderer; its fill is not mirror-symmetric, a triangle came out
a supersample wider on one side, so the outlines are sampled here instead.)
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from deltafm.data.shapes_config import PALETTE, SIZES, ShapeObject, ShapesConfig

__all__ = ["coverage", "render_objects"]


def _inside(shape: str, u: np.ndarray, v: np.ndarray, big: int) -> np.ndarray:
    c = big / 2
    if shape == "circle":
        return (u - c) ** 2 + (v - c) ** 2 <= c * c
    if shape == "square":
        return np.ones(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    if shape == "triangle":
        return np.abs(u - c) <= v / 2
    if shape == "diamond":
        return np.abs(u - c) + np.abs(v - c) <= c
    if shape == "cross":
        return (np.abs(u - c) <= big / 6) | (np.abs(v - c) <= big / 6)
    raise ValueError(f"no outline for shape {shape!r}")


@lru_cache(maxsize=256)
def coverage(shape: str, extent: int, supersample: int) -> np.ndarray:
    """Coverage a ∈ [0, 1] (float64, extent × extent, read-only) of ``shape`` in a box of ``extent`` pixels,
    sampled at ``supersample`` × ``supersample`` points per pixel (module docstring)."""
    big = extent * supersample
    centres = np.arange(big) + 0.5
    inside = _inside(shape, centres[None, :], centres[:, None], big)
    a = inside.reshape(extent, supersample, extent, supersample).mean(axis=(1, 3))
    a.setflags(write=False)
    return a


@lru_cache(maxsize=1024)
def _patch(shape: str, colour: str, extent: int, supersample: int) -> np.ndarray:
    """uint8 (3, extent, extent): round(a · rgb)."""
    rgb = np.asarray(PALETTE[colour], dtype=np.float64)[:, None, None]
    out = np.rint(coverage(shape, extent, supersample)[None] * rgb).astype(np.uint8)
    out.setflags(write=False)
    return out


def render_objects(objects: Sequence[ShapeObject], config: ShapesConfig, out: np.ndarray | None = None) -> np.ndarray:
    """The image (uint8 (3, canvas, canvas), black background) of ``objects``, drawn into ``out`` when given
    (which must be black where the objects go)."""
    if out is None:
        out = np.zeros((3, config.canvas, config.canvas), dtype=np.uint8)
    for obj in objects:
        x0, y0, x1, y1 = obj.bbox
        extent = config.size_px[SIZES.index(obj.size)]
        if x1 - x0 != extent or y1 - y0 != extent:
            raise ValueError(f"object box {obj.bbox} does not match its size {obj.size!r} ({extent} px)")
        out[:, y0:y1, x0:x1] = _patch(obj.shape, obj.colour, extent, config.supersample)
    return out
