"""Vocabularies, settings and ground-truth types of the coloured-shapes set (:mod:`deltafm.data.shapes`).

Geometry (pixels of the final canvas, x to the right, y down, pixel k covering [k, k + 1)):

* an object of size s ("small" or "large", extents ``size_px``) occupies the integer box
  [x0, x0 + e) × [y0, y0 + e), e = ``size_px[s]``, with ``border_px`` ≤ x0 and x0 + e ≤ canvas − ``border_px``;
  its centre is the box midpoint (x0 + e/2, y0 + e/2);
* two objects never overlap: their boxes, one of them grown by ``gap_px`` on every side, are disjoint, so
  they are apart by at least ``gap_px`` pixels along x or along y;
* the position cell is the 3 × 3 grid cell of the centre: col = ⌊3 cx / canvas⌋, row = ⌊3 cy / canvas⌋,
  cell id = 3 row + col, names :data:`CELLS` ("top left" … "bottom right");
* A is "left of" B when A's box ends before B's starts along x (A.x1 ≤ B.x0), "above" when A.y1 ≤ B.y0; the
  centres then differ by at least (e_A + e_B)/2 ≥ ``size_px[0]`` pixels along that axis.

Held-out pairs: n = round(``heldout_fraction`` · S · C) (shape, colour) pairs (at least 1 when the fraction is
positive), S shapes and C colours, taken diagonal by diagonal: k -> (shape i, colour (i + j) mod C) with
i = k mod S, j = ⌊k / S⌋, k < n, under a permutation of the shapes and one of the colours drawn from
``heldout_seed``. The pairs are distinct, each shape loses at most ⌈n/S⌉ colours, and with S ≤ C each colour
at most ⌈n/S⌉ shapes; a fraction that would leave a shape or a colour out of the train split is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from deltafm.data.datasets import DataError

__all__ = [
    "ALL_COLOURS", "ALL_SHAPES", "CELLS", "COLOURS", "FACTORS", "PALETTE", "RELATIONS", "SHAPES", "SIZES",
    "Scene", "ShapeObject", "ShapesConfig", "cell_of",
]

#: every shape the renderer draws (a "cross" is an upright plus sign)
ALL_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
#: the named colours (sRGB) the renderer knows: saturated, far apart, bright enough on black, and each still
#: nearest to itself when dimmed by anti-aliasing (orange is not: a dimmed yellow object's mean comes nearer
#: orange than yellow)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (50, 100, 255),
    "yellow": (240, 220, 30),
    "magenta": (220, 40, 220),
    "cyan": (30, 220, 230),
    "white": (245, 245, 245),
}
ALL_COLOURS: tuple[str, ...] = tuple(PALETTE)
#: the default vocabularies: every shape and colour
SHAPES: tuple[str, ...] = ALL_SHAPES
COLOURS: tuple[str, ...] = ALL_COLOURS
SIZES: tuple[str, ...] = ("small", "large")
#: 3 × 3 position cells, id = 3 row + col
CELLS: tuple[str, ...] = ("top left", "top", "top right", "left", "centre", "right",
                          "bottom left", "bottom", "bottom right")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
#: the per-object factors, in the order of the numeric encoding
FACTORS: tuple[str, ...] = ("shape", "colour", "size", "cell")


def cell_of(cx: float, cy: float, canvas: int) -> int:
    """Position cell id 3 row + col of a centre (cx, cy): col = ⌊3 cx / canvas⌋, row = ⌊3 cy / canvas⌋ (in 0..2)."""
    col = min(2, max(0, math.floor(3 * cx / canvas)))
    row = min(2, max(0, math.floor(3 * cy / canvas)))
    return 3 * row + col


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene: names from the vocabularies, box (x0, y0, x1, y1) with x1, y1 exclusive, the box
    midpoint as centre (x, y) and the 3 × 3 position cell id of the centre (names in :data:`CELLS`)."""

    shape: str
    colour: str
    size: str
    bbox: tuple[int, int, int, int]
    cell: int

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def cell_name(self) -> str:
        return CELLS[self.cell]

    def left_of(self, other: ShapeObject) -> bool:
        """This box ends before ``other``'s starts along x."""
        return self.bbox[2] <= other.bbox[0]

    def above(self, other: ShapeObject) -> bool:
        """This box ends before ``other``'s starts along y (y grows downwards)."""
        return self.bbox[3] <= other.bbox[1]


@dataclass(frozen=True)
class Scene:
    """The ground truth of one image: its objects in drawing order."""

    objects: tuple[ShapeObject, ...]

    @property
    def count(self) -> int:
        return len(self.objects)


def _names(kind: str, given: tuple[str, ...], known: tuple[str, ...]) -> tuple[str, ...]:
    given = tuple(given)
    unknown = [n for n in given if n not in known]
    if unknown:
        raise DataError(f"unknown {kind} {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    if len(set(given)) != len(given) or len(given) < 2:
        raise DataError(f"{kind}s must be at least 2 distinct names, got {given}")
    return given


@dataclass(frozen=True)
class ShapesConfig:
    """Settings of the coloured-shapes set; ``None`` fields take the defaults derived from ``canvas``.

    Attributes:
        canvas: side of the square RGB image in pixels (≥ 16).
        max_objects: a scene holds 1 … max_objects objects (uniform; at most 9).
        colours, shapes: the vocabularies (names from :data:`PALETTE`, :data:`ALL_SHAPES`); ids index them.
        size_px: extents (small, large) in pixels; default (round(canvas/4), round(13·canvas/32)), (8, 13) at 32.
        supersample: shapes are sampled at this factor per axis and box-filtered down (anti-aliasing; ≥ 2).
        heldout_fraction, heldout_seed: the held-out (shape, colour) pairs (module docstring).
        gap_px: least distance between objects; default max(1, canvas // 16).
        border_px: least distance to the canvas edge; default max(1, canvas // 32).
        position_margin: a caption names a centre's cell only when the centre is at least this far from the
            cell boundaries canvas/3, 2·canvas/3; single objects are placed that far inside their cell.
            Default canvas / 32.
    """

    canvas: int = 32
    max_objects: int = 3
    colours: tuple[str, ...] = COLOURS
    shapes: tuple[str, ...] = SHAPES
    size_px: tuple[int, int] | None = None
    supersample: int = 4
    heldout_fraction: float = 0.17
    heldout_seed: int = 0
    gap_px: int | None = None
    border_px: int | None = None
    position_margin: float | None = None

    def __post_init__(self) -> None:
        if int(self.canvas) != self.canvas or self.canvas < 16:
            raise DataError(f"canvas must be an integer >= 16 pixels, got {self.canvas}")
        if int(self.max_objects) != self.max_objects or not 1 <= self.max_objects <= 9:
            raise DataError(f"max_objects must be an integer in 1..9 (captions count in words), got {self.max_objects}")
        if int(self.supersample) != self.supersample or self.supersample < 2:
            raise DataError(f"supersample must be an integer >= 2 (anti-aliasing), got {self.supersample}")
        c = self.canvas
        object.__setattr__(self, "colours", _names("colour", self.colours, ALL_COLOURS))
        object.__setattr__(self, "shapes", _names("shape", self.shapes, ALL_SHAPES))
        defaults = {"size_px": (round(c / 4), round(13 * c / 32)), "gap_px": max(1, c // 16),
                    "border_px": max(1, c // 32), "position_margin": c / 32}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "size_px", tuple(int(v) for v in self.size_px))
        self._check_geometry()
        self._check_heldout()

    def _check_geometry(self) -> None:
        if len(self.size_px) != len(SIZES) or not 4 <= self.size_px[0] < self.size_px[1]:
            raise DataError(f"size_px must be (small, large) with 4 <= small < large, got {self.size_px}")
        if self.gap_px < 1 or self.border_px < 0 or self.position_margin < 0:
            raise DataError(f"need gap_px >= 1, border_px >= 0, position_margin >= 0, got "
                            f"{self.gap_px}, {self.border_px}, {self.position_margin}")
        k = math.ceil(math.sqrt(self.max_objects))
        room = self.canvas - 2 * self.border_px + self.gap_px
        if k * (self.size_px[1] + self.gap_px) > room:
            raise DataError(
                f"canvas {self.canvas} too small for {self.max_objects} objects of {self.size_px[1]} px "
                f"(a {k}x{k} grid of them with gap {self.gap_px} and border {self.border_px} must fit); "
                "lower max_objects or size_px, or raise canvas")
        for size in range(len(SIZES)):
            for cell in range(len(CELLS)):
                if not len(self.cell_offsets(size, cell % 3)):
                    raise DataError(f"canvas {self.canvas} too small: no {SIZES[size]} object "
                                    f"({self.size_px[size]} px) fits in cell {CELLS[cell]!r} with margin "
                                    f"{self.position_margin}")

    def _check_heldout(self) -> None:
        if not 0 <= self.heldout_fraction < 1:
            raise DataError(f"heldout_fraction must lie in [0, 1), got {self.heldout_fraction}")
        kept = self.train_pairs
        missing = sorted(set(self.shapes) - {s for s, _ in kept}) + sorted(set(self.colours) - {c for _, c in kept})
        if missing:
            raise DataError(f"heldout_fraction {self.heldout_fraction} holds out {self.num_heldout} of "
                            f"{len(self.shapes) * len(self.colours)} pairs and leaves {', '.join(missing)} out of "
                            "the train split; lower it")

    def vocab(self, factor: str) -> tuple[str, ...]:
        """Names of a factor of :data:`FACTORS`; ids index this tuple."""
        table = {"shape": self.shapes, "colour": self.colours, "size": SIZES, "cell": CELLS}
        if factor not in table:
            raise DataError(f"unknown factor {factor!r}; known: {', '.join(FACTORS)}")
        return table[factor]

    def extent(self, size: str) -> int:
        """Side in pixels of an object of ``size``."""
        return self.size_px[SIZES.index(size)]

    def offsets(self, size: int) -> np.ndarray:
        """Every admissible box start x0 (or y0) of an object of size id ``size``."""
        return np.arange(self.border_px, self.canvas - self.border_px - self.size_px[size] + 1)

    def cell_offsets(self, size: int, col: int) -> np.ndarray:
        """Box starts x0 whose centre falls in column ``col`` at least ``position_margin`` inside it."""
        x0 = self.offsets(size)
        cx = x0 + self.size_px[size] / 2
        lo, hi = col * self.canvas / 3, (col + 1) * self.canvas / 3
        inside = (cx >= lo + (self.position_margin if col > 0 else 0)) & (
            cx <= hi - (self.position_margin if col < 2 else 0))
        return x0[inside]

    def clear_cell(self, obj: ShapeObject) -> bool:
        """Whether ``obj``'s centre lies at least ``position_margin`` from every inner cell boundary."""
        bounds = (self.canvas / 3, 2 * self.canvas / 3)
        return all(abs(v - b) >= self.position_margin for v in obj.centre for b in bounds)

    @property
    def num_heldout(self) -> int:
        n = round(self.heldout_fraction * len(self.shapes) * len(self.colours))
        return max(n, 1) if self.heldout_fraction > 0 else 0

    @cached_property
    def heldout_pairs(self) -> tuple[tuple[str, str], ...]:
        """The held-out (shape, colour) pairs, sorted by ids (module docstring)."""
        rng = np.random.default_rng([self.heldout_seed, 7919])
        s, c = len(self.shapes), len(self.colours)
        sp, cp = rng.permutation(s), rng.permutation(c)
        ids = sorted((int(sp[k % s]), int(cp[(k % s + k // s) % c])) for k in range(self.num_heldout))
        return tuple((self.shapes[s], self.colours[c]) for s, c in ids)

    @cached_property
    def train_pairs(self) -> tuple[tuple[str, str], ...]:
        """The (shape, colour) pairs of the train split: all but the held-out ones."""
        held = set(self.heldout_pairs)
        return tuple((s, c) for s in self.shapes for c in self.colours if (s, c) not in held)
