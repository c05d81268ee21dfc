"""The procedural shapes set as training data: ``load_dataset("shapes")`` and ``load_dataset("shapes-scenes")``.

Two views of :mod:`deltafm.data.shapes` (generated here, deterministically; nothing is read from disk):

* ``shapes``: one object per image. The class label is the object's shape; every factor (shape, colour,
  size, cell) is also a named condition (``cond.<factor>``) for multi-condition training, and every image
  has a caption (``caption``) for text conditioning.
* ``shapes-scenes``: scenes of 1 to ``max_objects`` objects with a caption each (text-to-image). The class
  label is the number of objects minus one.

Splits (item i of a split depends only on the split and i): ``train`` = generator seed 0 over the (shape,
colour) pairs not held out, 60,000 items; ``test`` = seed 1, same pairs, 10,000 items; ``heldout`` =
seed 1, only scenes with a held-out pair (compositional generalisation), 10,000 items; ``all`` = seed 2,
any pair, 10,000 items. ``max_items`` keeps the first items; ``image_size`` is the canvas (default 32).
Captions are stored once each (``captions``) with a per-item index (``caption_ids``).
"""

from __future__ import annotations

import numpy as np
import torch

from deltafm.data.datasets import DataError, ImageDataset

__all__ = ["SPLITS", "load_shapes_dataset"]

#: split -> (generator split, seed, default number of items)
SPLITS: dict[str, tuple[str, int, int]] = {
    "train": ("train", 0, 60_000),
    "test": ("train", 1, 10_000),
    "heldout": ("heldout", 1, 10_000),
    "all": ("all", 2, 10_000),
}


def _dedupe(captions: tuple[str, ...]) -> tuple[tuple[str, ...], torch.Tensor]:
    """Distinct captions in order of first use, and each item's index into them (the shared
    :class:`~deltafm.data.captions.CaptionIndexer`; every generated caption is non-empty)."""
    from deltafm.data.captions import CaptionIndexer

    indexer = CaptionIndexer()
    for c in captions:
        indexer.add(c)
    distinct, codes = indexer.finish()
    return tuple(distinct), torch.from_numpy(codes)


def load_shapes_dataset(view: str = "single", split: str = "train", image_size: int | None = None,
                        max_items: int | None = None) -> ImageDataset:
    """Generate the ``single`` (one object, name ``shapes``) or ``scenes`` (``shapes-scenes``) view."""
    from deltafm.data.shapes import FACTORS, ShapesConfig, generate_shapes, generate_single_objects

    if split not in SPLITS:
        raise DataError(f"shapes split must be one of {', '.join(SPLITS)}, got {split!r}")
    gen_split, seed, n = SPLITS[split]
    if max_items is not None:
        n = min(n, max_items)
    config = ShapesConfig(canvas=32 if image_size is None else int(image_size))
    if view == "single":
        data = generate_single_objects(n, seed=seed, split=gen_split, config=config)
        shapes = config.vocab("shape")
        captions, caption_ids = _dedupe(data.captions)
        return ImageDataset(
            images=torch.from_numpy(data.images), labels=torch.from_numpy(data.labels["shape"].copy()),
            num_classes=len(shapes), name="shapes", class_names=tuple(shapes),
            conditions={f: torch.from_numpy(data.labels[f].copy()) for f in FACTORS},
            condition_values={f: tuple(config.vocab(f)) for f in FACTORS},
            captions=captions, caption_ids=caption_ids,
            meta={"shapes_split": split, "shapes_canvas": str(config.canvas)},
        )
    if view == "scenes":
        scenes = generate_shapes(n, seed=seed, split=gen_split, config=config)
        counts = np.array([s.count for s in scenes.scenes], dtype=np.int64) - 1
        captions, caption_ids = _dedupe(scenes.captions)
        return ImageDataset(
            images=torch.from_numpy(scenes.images), labels=torch.from_numpy(counts),
            num_classes=config.max_objects, name="shapes-scenes",
            class_names=tuple(f"{k + 1} object{'s' if k else ''}" for k in range(config.max_objects)),
            captions=captions, caption_ids=caption_ids,
            meta={"shapes_split": split, "shapes_canvas": str(config.canvas)},
        )
    raise DataError(f"shapes view must be 'single' or 'scenes', got {view!r}")
