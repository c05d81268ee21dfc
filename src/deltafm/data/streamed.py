"""A pixel dataset streamed from webdataset tar shards (or an image folder), read item by item.

``load_dataset("webdataset", root="data/shard-{000..099}.tar", image_size=64)`` indexes the tars once
(:mod:`deltafm.data.image_sources`: member offsets, labels from ``.cls`` / ``.json``, captions from
``.txt`` or the ``caption`` of ``.json``) and decodes only the images of each batch: PIL decode → ADM
centre crop to ``image_size`` (:mod:`deltafm.data.crop`) → uint8 → x = p / 127.5 − 1. Memory holds the
index (labels, offsets, captions), never the images, so a CC3M-sized set trains with bounded RSS; order,
resume and workers are those of every dataset (:class:`deltafm.data.loader.BatchLoader`). An image that
cannot be decoded is a ``DataError`` naming it (remove the sample, or re-run ``deltafm prepare-latents
--skip-bad`` for latents).

Captions, as :class:`~deltafm.data.datasets.ImageDataset` has them: ``captions`` (the distinct captions, a
compact :class:`~deltafm.data.captions.CaptionList`) and ``caption_ids`` (int64 (N,)), read per batch with
``load_extras(index, ["caption"])``; both None unless every item of the dataset (or subset) has a caption,
and then :meth:`StreamedImages.require_captions` names the first sample without one (tar and key).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from deltafm.data.captions import complete_ids, first_bad, missing_captions_error
from deltafm.data.crop import crop_to_array
from deltafm.data.datasets import DataError, ItemShape
from deltafm.data.image_sources import Source, open_source
from deltafm.pixels import model_to_uint8, uint8_to_model

__all__ = ["StreamedImages"]


class StreamedImages(ItemShape):
    """Images read on demand from a :class:`~deltafm.data.image_sources.Source`; duck-types
    :class:`~deltafm.data.datasets.ImageDataset` (``len``, ``labels``, ``num_classes``, ``name``,
    ``kind == "images"``, ``channels``, ``image_size``, ``shape``, ``subset``, ``class_counts``,
    ``to_model``, ``from_model``, ``ds[i]``) with the one batch path :meth:`load_batch`.

    Args:
        inputs: tar files, brace patterns, a folder of ``*.tar`` or an image folder (see ``open_source``).
        image_size: side of the ADM centre crop (required: the inputs may have any sizes).
        channels: 3 (RGB) or 1 (grayscale).
        name: the dataset's name.
    """

    kind = "images"
    latent_scale = 1.0
    latent_shift = 0.0
    #: REPA extras this dataset can load: none (pixel data is its own image)
    extra_names: tuple[str, ...] = ()

    def __init__(self, inputs: Sequence[str], image_size: int, channels: int = 3, name: str = "webdataset") -> None:
        if image_size is None or image_size < 1:
            raise DataError(f"dataset {name!r} needs data.image_size (the side of the centre crop), got {image_size}")
        if channels not in (1, 3):
            raise DataError(f"data.channels must be 1 or 3, got {channels}")
        self.source: Source = open_source(list(inputs))
        self.name = name
        self.num_classes = int(self.source.num_classes)
        self.class_names = tuple(self.source.class_names) if self.source.class_names else None
        self.meta = {"source": self.source.description}
        self._size, self._channels = int(image_size), int(channels)
        self._rows = np.arange(len(self.source), dtype=np.int64)
        self.labels = torch.from_numpy(np.asarray(self.source.labels, dtype=np.int64)[self._rows])
        self._set_captions()

    def _set_captions(self) -> None:
        ids = complete_ids(self._caption_codes())
        ok = ids is not None and len(self.source.captions) > 0
        self.caption_ids, self.captions = (ids, self.source.captions) if ok else (None, None)

    def _caption_codes(self) -> np.ndarray:
        codes = self.source.caption_codes
        return np.full(len(self._rows), -1, np.int64) if codes is None else codes[self._rows]

    def __len__(self) -> int:
        return int(self._rows.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._channels, self._size, self._size

    def to_model(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return uint8_to_model(x, dtype)

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        return model_to_uint8(x)

    def subset(self, indices: torch.Tensor | Sequence[int] | slice) -> StreamedImages:
        """A view of the selected items (nothing is read)."""
        out = object.__new__(StreamedImages)
        out.__dict__.update(self.__dict__)
        rows = self._rows[indices] if isinstance(indices, slice) else self._rows[np.asarray(indices, dtype=np.int64)]
        out._rows = np.ascontiguousarray(rows)
        out.labels = torch.from_numpy(np.asarray(self.source.labels, dtype=np.int64)[out._rows])
        out._set_captions()
        return out

    def caption_texts(self, index: torch.Tensor | Sequence[int]) -> list[str | None]:
        """The captions of items ``index`` (None where a sample has none, or an empty one)."""
        return [self.source.caption(int(self._rows[int(i)])) for i in index]

    def require_captions(self) -> None:
        """Nothing when every item has a caption; else a :class:`DataError` naming the first sample without one
        (tar and key) and how many have none."""
        codes = self._caption_codes()
        i = first_bad(codes)
        if i is not None:
            raise missing_captions_error(codes, self.source.caption_problem(int(self._rows[i])))

    def load_extras(self, index: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per-item extras of items ``index``: only ``caption`` (the caption ids, when every item has one);
        any other name is a :class:`DataError` (pixel data carries no REPA extras: run the encoder on x)."""
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        out = {}
        for name in names:
            if name == "caption" and self.caption_ids is not None:
                out[name] = self.caption_ids.index_select(0, index)
            elif name == "caption":
                self.require_captions()
                raise DataError(f"dataset {self.name!r} has no captions")  # pragma: no cover - an empty view
            else:
                raise DataError(f"dataset {self.name!r} has no extras {name!r}; pixel data carries no extras: run "
                                "the encoder on x itself")
        return out

    def uint8_batch(self, index: torch.Tensor) -> torch.Tensor:
        """Items ``index`` as uint8 (B, C, S, S): decoded, converted to RGB/L and ADM-cropped."""
        rows = self._rows[torch.as_tensor(index, dtype=torch.long).cpu().numpy()]
        mode = "RGB" if self._channels == 3 else "L"
        arrays = [crop_to_array(self.source.open_image(int(r), mode), self._size, self._channels) for r in rows]
        if not arrays:
            return torch.zeros((0, *self.shape), dtype=torch.uint8)
        return torch.from_numpy(np.stack(arrays))

    def load_batch(self, index: torch.Tensor, generator: torch.Generator | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Items ``index`` in model space (B, C, S, S); ``generator`` is unused (no randomness per item)."""
        return uint8_to_model(self.uint8_batch(index), dtype)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.load_batch(torch.tensor([int(index)]))[0], self.labels[int(index)]

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)
