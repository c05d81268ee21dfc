"""Procedural captioned coloured shapes: scenes of 1–3 non-overlapping objects on black, their ground truth,
true captions, held-out (shape, colour) pairs for compositional tests, and a single-object class-conditional
view. numpy only (the optional grid of :mod:`deltafm.data.shapes_grid` uses matplotlib). See docs/SHAPES.md.

Images are uint8 (N, 3, H, W), channel first like :class:`~deltafm.data.datasets.ImageDataset` (which
normalises them with ``p / 127.5 − 1``); :meth:`SingleObjects.dataset` wraps the single-object view as one.

Determinism: item i of a split depends only on (seed, view, split, i): its random numbers come from
``np.random.default_rng([seed, stream, i])`` (stream: one per view and split), so any subset or order of
indices (``start``) gives the same images, ground truth and captions.

Scenes: count n uniform in 1 … ``max_objects``; per object a size (uniform), a (shape, colour) pair (uniform
over the split's pairs: train -> the pairs not held out; all -> every pair; heldout -> one object, placed
first, from the held-out pairs and the others from every pair) and a box start uniform over the canvas:
100 candidate starts are drawn at once and the first whose box, grown by ``gap_px``, meets no earlier box is
taken. When none is free the whole scene is redrawn, up to 20 times, and if even that fails the scene keeps
the objects it placed (never seen with the default settings: 0 of 100,000 scenes). Objects are then listed
in a random order.

Single objects: size, 3 × 3 cell and (shape, colour) pair uniform; the box start is uniform among those that
put the centre at least ``position_margin`` inside the cell, so the cell label is clear.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from deltafm.data.datasets import DataError, ImageDataset
from deltafm.data.shapes_captions import caption_objects
from deltafm.data.shapes_config import (
    ALL_COLOURS,
    ALL_SHAPES,
    CELLS,
    COLOURS,
    FACTORS,
    PALETTE,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    ShapesConfig,
    cell_of,
)
from deltafm.data.shapes_render import render_objects

__all__ = [
    "ALL_COLOURS", "ALL_SHAPES", "CELLS", "COLOURS", "FACTORS", "PALETTE", "RELATIONS", "SHAPES", "SIZES", "SPLITS",
    "Scene", "ShapeObject", "ShapeScenes", "ShapesConfig", "SingleObjects", "decode_scenes", "encode_scenes",
    "generate_shapes", "generate_single_objects", "sample_scene", "sample_single_object",
]

SPLITS: tuple[str, ...] = ("train", "heldout", "all")
_VIEWS = ("scenes", "single")
_TRIES, _RESTARTS = 100, 20


def _rng(seed: int, view: str, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if int(seed) != seed or seed < 0 or int(index) != index or index < 0:
        raise DataError(f"seed and index must be integers >= 0, got seed {seed}, index {index}")
    return np.random.default_rng([int(seed), 3 * _VIEWS.index(view) + SPLITS.index(split), int(index)])


def _pair(rng: np.random.Generator, pairs: Sequence[tuple[str, str]]) -> tuple[str, str]:
    return pairs[int(rng.integers(len(pairs)))]


@lru_cache(maxsize=64)
def _all_pairs(config: ShapesConfig) -> tuple[tuple[str, str], ...]:
    return tuple((s, c) for s in config.shapes for c in config.colours)


def _split_pairs(config: ShapesConfig, split: str) -> tuple[tuple[str, str], ...]:
    if split == "heldout":
        if not config.heldout_pairs:
            raise DataError("the heldout split is empty: heldout_fraction is 0")
        return config.heldout_pairs
    return config.train_pairs if split == "train" else _all_pairs(config)


def _apart(a: tuple[int, int, int, int], b: tuple[np.ndarray, ...], gap: int) -> np.ndarray:
    """Whether box ``a`` and the boxes ``b`` (x0, y0, x1, y1 arrays), one grown by ``gap``, are disjoint."""
    return (a[2] + gap <= b[0]) | (b[2] + gap <= a[0]) | (a[3] + gap <= b[1]) | (b[3] + gap <= a[1])


def _attempt(n: int, config: ShapesConfig, split: str, rng: np.random.Generator) -> list[ShapeObject]:
    """Draw n objects and place them one by one; stops early (fewer objects) when one finds no place."""
    placed: list[ShapeObject] = []
    everything = _all_pairs(config)
    for k in range(n):
        size = int(rng.integers(len(SIZES)))
        if split == "heldout":
            shape, colour = _pair(rng, config.heldout_pairs if k == 0 else everything)
        else:
            shape, colour = _pair(rng, _split_pairs(config, split))
        offsets, e = config.offsets(size), config.size_px[size]
        xy = offsets[rng.integers(len(offsets), size=(_TRIES, 2))]  # the candidate starts, tried in order
        free = np.ones(_TRIES, dtype=bool)
        for o in placed:
            free &= _apart(o.bbox, (xy[:, 0], xy[:, 1], xy[:, 0] + e, xy[:, 1] + e), config.gap_px)
        if not free.any():
            return placed
        x0, y0 = (int(v) for v in xy[np.argmax(free)])
        box = (x0, y0, x0 + e, y0 + e)
        placed.append(ShapeObject(shape, colour, SIZES[size], box, cell_of(x0 + e / 2, y0 + e / 2, config.canvas)))
    return placed


def sample_scene(index: int, seed: int = 0, split: str = "train",
                 config: ShapesConfig | None = None) -> tuple[Scene, str]:
    """Scene ``index`` of ``split`` under ``seed`` and its caption (module docstring)."""
    config = config or ShapesConfig()
    rng = _rng(seed, "scenes", split, index)
    _split_pairs(config, split)  # refuses an empty heldout split
    n = 1 + int(rng.integers(config.max_objects))
    for _ in range(_RESTARTS):
        objects = _attempt(n, config, split, rng)
        if len(objects) == n:
            break
    objects = [objects[i] for i in rng.permutation(len(objects))]
    return Scene(tuple(objects)), caption_objects(objects, config, rng)


def sample_single_object(index: int, seed: int = 0, split: str = "train",
                         config: ShapesConfig | None = None) -> tuple[ShapeObject, str]:
    """Single object ``index`` of ``split`` under ``seed`` and its caption (module docstring)."""
    config = config or ShapesConfig()
    rng = _rng(seed, "single", split, index)
    size, cell = int(rng.integers(len(SIZES))), int(rng.integers(len(CELLS)))
    shape, colour = _pair(rng, _split_pairs(config, split))
    row, col = divmod(cell, 3)
    xs, ys = config.cell_offsets(size, col), config.cell_offsets(size, row)
    x0, y0 = int(xs[rng.integers(len(xs))]), int(ys[rng.integers(len(ys))])
    e = config.size_px[size]
    obj = ShapeObject(shape, colour, SIZES[size], (x0, y0, x0 + e, y0 + e), cell)
    return obj, caption_objects([obj], config, rng)


def _check_count(n: int, start: int) -> None:
    if int(n) != n or n < 0 or int(start) != start or start < 0:
        raise DataError(f"n and start must be integers >= 0, got n {n}, start {start}")


@dataclass(frozen=True, eq=False)
class ShapeScenes:
    """Items start … start + N − 1 of a split: ``images`` uint8 (N, 3, canvas, canvas), their ``scenes``
    (ground truth) and ``captions``."""

    images: np.ndarray
    scenes: tuple[Scene, ...]
    captions: tuple[str, ...]
    config: ShapesConfig

    def __len__(self) -> int:
        return len(self.scenes)

    def encode(self) -> dict[str, np.ndarray]:
        """The ground truth as integer arrays (:func:`encode_scenes`)."""
        return encode_scenes(self.scenes, self.config)


def generate_shapes(n: int, seed: int = 0, split: str = "train", config: ShapesConfig | None = None,
                    start: int = 0) -> ShapeScenes:
    """Scenes ``start`` … ``start + n − 1`` of ``split`` ("train": no held-out (shape, colour) pair;
    "heldout": at least one; "all": any) under ``seed``, rendered, with ground truth and captions."""
    config = config or ShapesConfig()
    _check_count(n, start)
    images = np.zeros((n, 3, config.canvas, config.canvas), dtype=np.uint8)
    scenes, captions = [], []
    for k in range(n):
        scene, caption = sample_scene(start + k, seed, split, config)
        render_objects(scene.objects, config, out=images[k])
        scenes.append(scene)
        captions.append(caption)
    return ShapeScenes(images, tuple(scenes), tuple(captions), config)


@dataclass(frozen=True, eq=False)
class SingleObjects:
    """One object per image: ``images`` uint8 (N, 3, canvas, canvas), ``labels`` int64 (N,) per factor of
    :data:`FACTORS` (ids into ``config.vocab(factor)``), the ``objects`` and ``captions``."""

    images: np.ndarray
    labels: dict[str, np.ndarray]
    objects: tuple[ShapeObject, ...]
    captions: tuple[str, ...]
    config: ShapesConfig

    def __len__(self) -> int:
        return len(self.objects)

    def class_ids(self, factors: Sequence[str] = ("shape",)) -> tuple[np.ndarray, tuple[str, ...]]:
        """Combined class ids of ``factors`` and their names: id = Σ_f id_f · Π_{g after f} |vocab_g|
        (row-major), name = the factors' names joined by spaces in the order given, so ("colour", "shape")
        names class 0 "red circle" by default."""
        factors = tuple(factors)
        if not factors or len(set(factors)) != len(factors):
            raise DataError(f"factors must be distinct names from {FACTORS}, got {factors}")
        vocabs = [self.config.vocab(f) for f in factors]
        ids = np.zeros(len(self), dtype=np.int64)
        for f, vocab in zip(factors, vocabs):
            ids = ids * len(vocab) + self.labels[f]
        names = [""]
        for vocab in vocabs:
            names = [f"{a} {b}".strip() for a in names for b in vocab]
        return ids, tuple(names)

    def dataset(self, factors: Sequence[str] = ("shape",), name: str = "shapes") -> ImageDataset:
        """An :class:`ImageDataset` labelled by the combined class of ``factors`` (:meth:`class_ids`)."""
        ids, names = self.class_ids(factors)
        return ImageDataset.from_numpy(self.images, ids, len(names), name, class_names=names)


def generate_single_objects(n: int, seed: int = 0, split: str = "train", config: ShapesConfig | None = None,
                            start: int = 0) -> SingleObjects:
    """Single-object images ``start`` … ``start + n − 1`` of ``split`` (train: pairs not held out; heldout:
    only held-out pairs; all: any) under ``seed``, with one label per factor and a caption each."""
    config = config or ShapesConfig()
    _check_count(n, start)
    images = np.zeros((n, 3, config.canvas, config.canvas), dtype=np.uint8)
    objects, captions = [], []
    for k in range(n):
        obj, caption = sample_single_object(start + k, seed, split, config)
        render_objects([obj], config, out=images[k])
        objects.append(obj)
        captions.append(caption)
    codes = _object_ids(objects, config)
    labels = {f: codes[:, i].astype(np.int64) for i, f in enumerate(FACTORS)}
    return SingleObjects(images, labels, tuple(objects), tuple(captions), config)


def _object_ids(objects: Sequence[ShapeObject], config: ShapesConfig) -> np.ndarray:
    """(len(objects), 4) ids of shape, colour, size, cell."""
    index = {f: {v: i for i, v in enumerate(config.vocab(f))} for f in FACTORS[:3]}
    try:
        rows = [(index["shape"][o.shape], index["colour"][o.colour], index["size"][o.size], o.cell) for o in objects]
    except KeyError as err:
        raise DataError(f"{err.args[0]!r} is not in the vocabularies of this config") from None
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), len(FACTORS))


def encode_scenes(scenes: Sequence[Scene], config: ShapesConfig) -> dict[str, np.ndarray]:
    """Ground truth as int16 arrays, padded with −1 to ``config.max_objects`` objects: ``count`` (N,),
    ``shape``, ``colour``, ``size``, ``cell`` (N, M) (ids into ``config.vocab``), ``bbox`` (N, M, 4)
    (x0, y0, x1, y1). Storable in .npz or safetensors; :func:`decode_scenes` inverts it exactly."""
    n, m = len(scenes), config.max_objects
    out = {"count": np.zeros(n, dtype=np.int16), "bbox": np.full((n, m, 4), -1, dtype=np.int16)}
    out.update({f: np.full((n, m), -1, dtype=np.int16) for f in FACTORS})
    for k, scene in enumerate(scenes):
        if scene.count > m:
            raise DataError(f"scene {k} holds {scene.count} objects, more than max_objects {m}")
        out["count"][k] = scene.count
        codes = _object_ids(scene.objects, config)
        for i, f in enumerate(FACTORS):
            out[f][k, : scene.count] = codes[:, i]
        out["bbox"][k, : scene.count] = [o.bbox for o in scene.objects]
    return out


def decode_scenes(arrays: Mapping[str, np.ndarray], config: ShapesConfig) -> tuple[Scene, ...]:
    """The scenes of :func:`encode_scenes` output (same ``config``); refuses arrays that are not such output."""
    keys = ("count", "bbox", *FACTORS)
    if missing := [k for k in keys if k not in arrays]:
        raise DataError(f"encoded scenes lack {', '.join(missing)}")
    a = {k: np.asarray(arrays[k]).astype(np.int64) for k in keys}
    n, m = len(a["count"]), config.max_objects
    if a["bbox"].shape != (n, m, 4) or any(a[f].shape != (n, m) for f in FACTORS):
        raise DataError(f"encoded scenes: expected count ({n},), bbox ({n}, {m}, 4) and ({n}, {m}) ids")
    scenes = []
    for k in range(n):
        c = int(a["count"][k])
        pad = [a[f][k, c:] for f in (*FACTORS, "bbox")]
        if not 1 <= c <= m or any((p != -1).any() for p in pad):
            raise DataError(f"encoded scene {k}: count {c} outside 1..{m} or padding other than -1")
        objects = []
        for j in range(c):
            ids = [int(a[f][k, j]) for f in FACTORS]
            if any(not 0 <= v < len(config.vocab(f)) for v, f in zip(ids, FACTORS)):
                raise DataError(f"encoded scene {k}, object {j}: ids {ids} outside the vocabularies")
            box = tuple(int(v) for v in a["bbox"][k, j])
            objects.append(ShapeObject(*(config.vocab(f)[v] for v, f in zip(ids[:3], FACTORS)), box, ids[3]))
        scenes.append(Scene(tuple(objects)))
    return tuple(scenes)
