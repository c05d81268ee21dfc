"""An image folder, one subfolder per class, loaded into memory as uint8 (N, C, H, W).

Layout::

    root/
      cat/  0001.png  0002.jpg  more/0003.png ...
      dog/  ...

Class ids are the positions of the subfolder names in sorted order (``cat`` -> 0, ``dog`` -> 1). Images
are found recursively inside each class folder (extensions in :data:`IMAGE_EXTENSIONS`, case-insensitive;
names starting with "." are skipped) and ordered by their relative path, so the item order is the same on
every machine.

Each image is converted to "L" (channels=1) or "RGB" (channels=3; an alpha channel is dropped). With
``image_size`` set, it is resized (bicubic, antialiased by PIL) so that its shorter side equals
``image_size`` and then center-cropped to ``image_size`` x ``image_size``; without it, all images must
already have the same size. Uses Pillow (a dependency of matplotlib).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deltafm.data.datasets import DataError, ImageDataset

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "list_image_folder", "load_image_folder", "resize_center_crop"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def list_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """Return (class names in id order, [(image path, class id), ...] in a fixed order).

    Raises:
        FileNotFoundError: ``root`` is not a folder, has no class subfolders, or no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {root} does not exist; expected root/<class name>/<images> "
            f"(extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"image folder {root} has no class subfolders (expected root/<class>/<images>)")
    items: list[tuple[Path, int]] = []
    for class_id, class_name in enumerate(classes):
        class_dir = root / class_name
        files = sorted(
            (p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
            key=lambda p: p.relative_to(class_dir).as_posix(),
        )
        files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(class_dir).parts)]
        items.extend((p, class_id) for p in files)
    if not items:
        raise FileNotFoundError(f"image folder {root}: no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return classes, items


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize a PIL image so its shorter side is ``size`` (bicubic), then crop the central size x size."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image_folder(
    root: str | os.PathLike,
    image_size: int | None = None,
    channels: int = 3,
    name: str = "folder",
) -> ImageDataset:
    """Load every image of a class-per-subfolder tree into a uint8 :class:`ImageDataset`.

    Args:
        root: the folder holding one subfolder per class.
        image_size: square output size (resize shorter side + center crop); ``None`` keeps the sizes,
            which must then all be equal.
        channels: 1 (grayscale) or 3 (RGB).
        name: dataset name stored on the result.

    Raises:
        FileNotFoundError: no folder, classes or images.
        DataError (a ValueError): bad options, an unreadable image, or unequal sizes without ``image_size``.
    """
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    if image_size is not None and image_size < 1:
        raise DataError(f"image_size must be >= 1, got {image_size}")
    from PIL import Image, UnidentifiedImageError

    classes, items = list_image_folder(root)
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for path, _ in items:
        try:
            with Image.open(path) as img:
                img = img.convert(mode)
                if image_size is not None:
                    img = resize_center_crop(img, image_size)
                arr = np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"cannot read image {path}: {err}") from err
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if arrays and arr.shape != arrays[0].shape:
            raise DataError(
                f"{path} is {arr.shape[2]}x{arr.shape[1]} but {items[0][0]} is "
                f"{arrays[0].shape[2]}x{arrays[0].shape[1]}; pass image_size to resize and crop"
            )
        arrays.append(arr)
    images = np.stack(arrays)
    labels = np.array([c for _, c in items], dtype=np.int64)
    return ImageDataset.from_numpy(images, labels, num_classes=len(classes), name=name, class_names=classes)
