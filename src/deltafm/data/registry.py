"""The dataset registry: one builder, by name, for training, the study and the evaluation CLI.

:func:`load_dataset` with names ``fashion-mnist``, ``mnist``, ``digits``, ``folder``, ``latents``,
``webdataset``, ``shapes`` and ``shapes-scenes`` (generated, :mod:`deltafm.data.shapes_dataset`).
Image datasets come back in memory (:class:`ImageDataset`); ``latents`` comes back as a lazy
:class:`~deltafm.data.latent_store.LatentStore` (labels in memory, items read per batch), which has the
same attributes and the same batch method ``load_batch`` but no ``images`` tensor. Loaders are imported
lazily so that ``import deltafm.data`` needs neither PIL nor sklearn.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from deltafm.data.datasets import DataError, ImageDataset

if TYPE_CHECKING:
    from deltafm.data.latent_store import LatentStore
    from deltafm.data.streamed import StreamedImages

__all__ = ["DATASETS", "load_dataset"]

#: Known dataset names and one line on each.
DATASETS: dict[str, str] = {
    "fashion-mnist": "Fashion-MNIST IDX files (default root /usr/share/datasets/fashion-mnist), 28x28 gray",
    "mnist": "MNIST IDX files at root (required), 28x28 gray",
    "digits": "scikit-learn's bundled 8x8 digits (no files needed)",
    "folder": "image folder at root, one subfolder per class or flat (image_size and channels options); captions "
              "from img.txt beside img.png",
    "latents": "safetensors latent shards at root, read lazily (see deltafm.data.latents, latent_store); captions "
               "from the captions-XXXXX.json files beside them",
    "shapes": "procedural coloured shapes, one object per image (generated; labels: shape; conditions shape, "
              "colour, size, cell; captions); splits train/test/heldout/all; image_size = canvas (32)",
    "shapes-scenes": "procedural captioned scenes of 1-3 coloured shapes (generated; text-to-image); splits as shapes",
    "webdataset": "webdataset tar shards at root (a .tar, a brace pattern or a folder of .tar), images read per "
                  "batch and centre-cropped to image_size (required); labels from .cls/.json, captions from .txt "
                  "or the json's caption (img2dataset's CC3M layout)",
}


def _split_dir(root: Path, split: str) -> Path:
    """``root/split`` if that folder exists, else ``root`` itself."""
    sub = root / split
    return sub if sub.is_dir() else root


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    image_size: int | None = None,
    channels: int | None = None,
    max_items: int | None = None,
) -> ImageDataset | LatentStore | StreamedImages:
    """Load a dataset by name: images into memory, latents as a lazy store (headers and labels only).

    Args:
        name: one of :data:`DATASETS`.
        root: data folder. Defaults: Fashion-MNIST -> /usr/share/datasets/fashion-mnist; digits needs none;
            mnist, folder and latents require it. For folder and latents, ``root/split`` is used when that
            folder exists, else ``root``.
        split: "train" or "test" (digits: also "all").
        image_size: folder only: resize the shorter side and center-crop to this size.
        channels: folder only: 1 (grayscale) or 3 (RGB, default).
        max_items: keep only the first ``max_items`` items (quick runs and tests).

    Raises:
        DataError (a ValueError): unknown name (lists the known ones), or an option the dataset does not take.
        FileNotFoundError: data files missing (the message says what is expected and how to get it).
    """
    key = name.lower().replace("_", "-")
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    sized = ("folder", "webdataset", "shapes", "shapes-scenes")
    if key not in sized and (image_size is not None or channels is not None):
        raise DataError(f"dataset {key!r} takes no image_size/channels options (only {', '.join(sized)} do)")
    if key.startswith("shapes"):
        from deltafm.data.shapes_dataset import load_shapes_dataset

        if channels not in (None, 3):
            raise DataError(f"dataset {key!r} is RGB: channels must be 3 or unset, got {channels}")
        return load_shapes_dataset("single" if key == "shapes" else "scenes", split, image_size, max_items)
    if key in ("mnist", "folder", "latents", "webdataset") and root is None:
        raise DataError(f"dataset {key!r} needs a root folder (data.root=DIR)")

    ds: ImageDataset | LatentStore | StreamedImages
    if key == "fashion-mnist":
        from deltafm.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, load_idx_dataset

        ds = load_idx_dataset(
            FASHION_MNIST_ROOT if root is None else root,
            split,
            name="fashion-mnist",
            class_names=FASHION_MNIST_CLASSES,
        )
    elif key == "mnist":
        from deltafm.data.idx import load_idx_dataset

        ds = load_idx_dataset(root, split, name="mnist", class_names=tuple(str(d) for d in range(10)))
    elif key == "digits":
        from deltafm.data.digits import load_digits_dataset

        ds = load_digits_dataset(split)
    elif key == "folder":
        from deltafm.data.folder import load_image_folder

        ds = load_image_folder(
            _split_dir(Path(root), split),
            image_size=image_size,
            channels=3 if channels is None else channels,
        )
    elif key == "webdataset":
        from deltafm.data.streamed import StreamedImages

        sub = Path(root) / split
        ds = StreamedImages([str(sub if sub.is_dir() else root)], image_size=image_size,  # type: ignore[arg-type]
                            channels=3 if channels is None else channels)
    else:
        from deltafm.data.latent_store import LatentStore

        ds = LatentStore(_split_dir(Path(root), split))
    if max_items is not None:
        if max_items < 1:
            raise DataError(f"max_items must be >= 1, got {max_items}")
        ds = ds.subset(slice(0, max_items))
    return ds
