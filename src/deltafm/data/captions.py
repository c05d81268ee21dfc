"""Captions of image datasets: the distinct texts in one compact list, and each item's caption id.

Where captions come from (docs/DATA.md, "Captions"):

* ``folder`` datasets and folder inputs: a text file with the image's stem beside it, ``img_001.png`` +
  ``img_001.txt`` (:func:`folder_captions`);
* webdataset tars (``webdataset``, ``prepare-latents --input``): the sample's ``KEY.txt`` member, else the
  string field ``caption`` of ``KEY.json`` (the layout img2dataset writes; :mod:`deltafm.data.image_sources`);
* ``latents``: the ``captions-XXXXX.json`` file ``deltafm prepare-latents`` writes beside each shard from such
  inputs (:mod:`deltafm.data.latent_captions`).

A caption is its text with surrounding whitespace stripped (UTF-8; undecodable bytes become U+FFFD). Every
item gets a *code*: the index of its caption among the distinct captions (in order of first use), or
:data:`MISSING` (no caption) or :data:`EMPTY` (a caption that is blank after stripping). A dataset whose
items all have a caption exposes ``captions`` (the distinct texts) and ``caption_ids`` (int64 (N,)), as
:class:`~deltafm.data.datasets.ImageDataset` does; otherwise both are None and ``require_captions()`` raises
a :class:`DataError` naming the first item without one. Only text conditioning asks, so a class-conditioned
run on partly captioned data is unaffected.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import overload

import numpy as np
import torch

from deltafm.data.datasets import DataError

__all__ = ["EMPTY", "MISSING", "CaptionIndexer", "CaptionList", "complete_ids", "first_bad", "folder_captions",
           "folder_problem", "missing_captions_error"]

#: the code of an item without a caption
MISSING = -1
#: the code of an item whose caption is blank after stripping
EMPTY = -2


class CaptionList(Sequence[str]):
    """Captions as one UTF-8 byte string and int64 offsets: no Python object per caption, so CC3M's 3.3 M
    captions take about their text's bytes plus 8 bytes each, and are shared, untouched, by forked loader
    workers. ``captions[i]`` decodes caption i; ``len``, iteration and slices (a list) as a tuple's."""

    def __init__(self, texts: Sequence[str] = ()) -> None:
        data = [t.encode("utf-8") for t in texts]
        self._offsets = np.zeros(len(data) + 1, dtype=np.int64)
        np.cumsum(np.fromiter((len(b) for b in data), dtype=np.int64, count=len(data)), out=self._offsets[1:])
        self._blob = b"".join(data)

    def __len__(self) -> int:
        return int(self._offsets.shape[0]) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        n = len(self)
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(n))]
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"caption index {i} out of range for {n} captions")
        return self._blob[int(self._offsets[i]):int(self._offsets[i + 1])].decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"CaptionList({len(self)} captions, {len(self._blob)} bytes)"


class CaptionIndexer:
    """Collects items' captions in order: :meth:`add` each item's raw text (None: no caption), then
    :meth:`finish` gives (the distinct stripped captions, each item's code)."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._codes = array("q")

    def add(self, text: str | None) -> int:
        """Record the next item's caption; returns its code."""
        if text is None:
            code = MISSING
        else:
            text = text.strip()
            code = self._ids.setdefault(text, len(self._ids)) if text else EMPTY
        self._codes.append(code)
        return code

    def finish(self) -> tuple[CaptionList, np.ndarray]:
        """(distinct captions, int64 codes of the items added)."""
        return CaptionList(list(self._ids)), np.frombuffer(self._codes, dtype=np.int64).copy()


def complete_ids(codes: np.ndarray) -> torch.Tensor | None:
    """The items' caption ids (int64 tensor) when every code is a caption id (>= 0), else None."""
    if codes.size and int(codes.min()) < 0:
        return None
    return torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int64))


def first_bad(codes: np.ndarray) -> int | None:
    """Position of the first item without a caption (code < 0), or None."""
    bad = np.flatnonzero(codes < 0)
    return int(bad[0]) if bad.size else None


def missing_captions_error(codes: np.ndarray, problem: str) -> DataError:
    """The error for items without a caption: ``problem`` (what is wrong with the first, naming it) and how
    many of the items have none."""
    n_bad = int((codes < 0).sum())
    return DataError(f"{problem} ({n_bad} of {codes.size} items have no usable caption); text conditioning "
                     "needs a caption for every image (docs/DATA.md, 'Captions')")


def folder_captions(images: Sequence[Path], present: set[Path] | None = None) -> CaptionIndexer:
    """Captions of image files from the text files beside them (``img.png`` -> ``img.txt``). ``present``: the
    caption files known to exist (from a directory listing; None: ask the file system for each image)."""
    out = CaptionIndexer()
    for image in images:
        txt = image.with_suffix(".txt")
        exists = txt.is_file() if present is None else txt in present
        out.add(txt.read_bytes().decode("utf-8", errors="replace") if exists else None)
    return out


def folder_problem(image: Path, code: int) -> str:
    """What is wrong with the caption of a folder image whose code is negative."""
    txt = image.with_suffix(".txt")
    if code == EMPTY:
        return f"caption file {txt} is empty"
    return f"image {image} has no caption file {txt.name} beside it"
