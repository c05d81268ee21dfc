"""An image folder, one subfolder per class or a flat folder of images, loaded into memory as uint8 (N, C, H, W).

Layouts::

    root/                                   root/
      cat/  0001.png  0002.jpg  more/0003.png     img_001.png  img_001.txt
      dog/  ...                                   img_002.jpg  img_002.txt ...

With class subfolders, class ids are the positions of the subfolder names in sorted order (``cat`` -> 0,
``dog`` -> 1) and images are found recursively inside each class folder; a folder without subfolders is
one class (label 0, no class names); a folder holding both subfolders and images directly in it is refused
(a :class:`DataError`). Images have extensions in :data:`IMAGE_EXTENSIONS` (case-insensitive; names starting
with "." are skipped) and are ordered by their relative path, so the item order is the same on every machine.

**Captions** (text-to-image, either layout): a text file with the image's stem beside it, ``img_001.png`` +
``img_001.txt`` (UTF-8, surrounding whitespace stripped; :mod:`deltafm.data.captions`). When every image has
a non-empty one the dataset has ``captions`` and ``caption_ids``; otherwise it has none, and
``require_captions()`` (called by text conditioning) raises a :class:`DataError` naming the first image
without a caption file, or the empty caption file. Text files that match no image are ignored.

Each image is converted to "L" (channels=1) or "RGB" (channels=3; an alpha channel is dropped). With
``image_size`` set, it is resized (bicubic, antialiased by PIL) so that its shorter side equals
``image_size`` and then center-cropped to ``image_size`` x ``image_size``; without it, all images must
already have the same size. Uses Pillow (a dependency of matplotlib).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from deltafm.data.captions import complete_ids, first_bad, folder_captions, folder_problem, missing_captions_error
from deltafm.data.datasets import DataError, ImageDataset

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "FolderImages", "list_image_folder", "load_image_folder", "resize_center_crop"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _images_in(folder: Path) -> list[Path]:
    """Images below ``folder`` (recursively, hidden names skipped), ordered by their path inside it."""
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    return [p for p in files if not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def list_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """Return (class names in id order, [(image path, class id), ...] in a fixed order); a flat folder (no
    subfolders) gives no class names and label 0 for every image.

    Raises:
        FileNotFoundError: ``root`` is not a folder, or has no images.
        DataError: ``root`` holds both class subfolders and images directly in it.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {root} does not exist; expected root/<class name>/<images> or root/<images> "
            f"(extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted((p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                    and not p.name.startswith(".")), key=lambda p: p.name)
    if classes and loose:
        raise DataError(f"image folder {root} holds both class subfolders ({', '.join(classes[:3])}"
                        f"{', ...' if len(classes) > 3 else ''}) and {len(loose)} image(s) directly in it (first: "
                        f"{loose[0].name}); move the images into a class folder, or the class folders' images up")
    items: list[tuple[Path, int]] = [(p, 0) for p in loose]
    for class_id, class_name in enumerate(classes):
        items.extend((p, class_id) for p in _images_in(root / class_name))
    if not items:
        raise FileNotFoundError(f"image folder {root}: no images with extensions {', '.join(IMAGE_EXTENSIONS)} "
                                "(expected root/<class>/<images> or root/<images>)")
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
    """Load every image of a class-per-subfolder tree, or of a flat folder, into a uint8 :class:`FolderImages`
    (an :class:`ImageDataset`), with the captions of the text files beside the images (module docstring).

    Args:
        root: the folder holding one subfolder per class, or the images themselves.
        image_size: square output size (resize shorter side + center crop); ``None`` keeps the sizes,
            which must then all be equal.
        channels: 1 (grayscale) or 3 (RGB).
        name: dataset name stored on the result.

    Raises:
        FileNotFoundError: no folder or no images.
        DataError (a ValueError): bad options, subfolders and images side by side, an unreadable image, or
            unequal sizes without ``image_size``.
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
    texts, codes = folder_captions([p for p, _ in items]).finish()
    ids = complete_ids(codes)
    return FolderImages(
        images=torch.from_numpy(np.stack(arrays)), labels=torch.tensor([c for _, c in items], dtype=torch.int64),
        num_classes=max(1, len(classes)), name=name, class_names=tuple(classes) if classes else None,
        captions=tuple(texts) if ids is not None else None, caption_ids=ids,
        files=tuple(str(p) for p, _ in items), caption_codes=torch.from_numpy(codes), caption_texts=tuple(texts))


@dataclass
class FolderImages(ImageDataset):
    """An image folder in memory (:func:`load_image_folder`): an :class:`ImageDataset` that also keeps each
    item's file and caption code (:mod:`deltafm.data.captions`), so that :meth:`require_captions` names the
    first image without a caption. ``captions`` / ``caption_ids`` are set when every item has a caption."""

    files: tuple[str, ...] = ()
    caption_codes: torch.Tensor | None = None
    caption_texts: tuple[str, ...] = ()

    def require_captions(self) -> None:
        """Nothing when every item has a caption; else a :class:`DataError` naming the first image without a
        caption file, or its empty caption file."""
        if self.caption_codes is None:
            raise DataError(f"dataset {self.name!r} records no captions (load it with load_image_folder)")
        codes = self.caption_codes.numpy()
        i = first_bad(codes)
        if i is not None:
            raise missing_captions_error(codes, folder_problem(Path(self.files[i]), int(codes[i])))

    def subset(self, indices: torch.Tensor | Sequence[int] | slice) -> FolderImages:
        """A dataset of the selected items (same classes; files and captions follow the items)."""
        out = super().subset(indices)
        if isinstance(indices, slice):
            pos = np.arange(len(self))[indices]
        else:
            pos = torch.as_tensor(indices, dtype=torch.long).cpu().numpy()
        if self.caption_codes is None:
            return replace(out, files=tuple(self.files[int(i)] for i in pos) if self.files else ())
        codes = self.caption_codes[torch.from_numpy(np.ascontiguousarray(pos))]
        ids = complete_ids(codes.numpy())
        return replace(out, files=tuple(self.files[int(i)] for i in pos), caption_codes=codes,
                       captions=self.caption_texts if ids is not None else None, caption_ids=ids)
