"""Captions of latent shards, for text-to-image training on latents.

``deltafm prepare-latents`` writes, beside shard ``shard-XXXXX.safetensors`` of an input with captions (tars
with ``.txt`` members or a ``caption`` in ``.json``, image folders with caption files, a captioned dataset such
as ``shapes-scenes``), the file ``captions-XXXXX.json``::

    {"shard": "shard-XXXXX.safetensors", "names": [...], "flipped": [...], "captions": [str | null, ...]}

aligned with the shard's rows (a ``--flip`` mirror carries its image's caption). :class:`LatentCaptions`, a
mixin of :class:`~deltafm.data.latent_store.LatentStore`, reads them on first use (text conditioning asks;
a store of class-labelled latents never opens them) into a compact :class:`~deltafm.data.captions.CaptionList`
and one code per item (:mod:`deltafm.data.captions`). A shard without its captions file, a ``null`` and a
blank caption are items without a caption; a captions file that does not match its shard (not JSON, another
shard's name, a different number of rows) is a :class:`DataError` naming it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltafm.data.captions import EMPTY, CaptionIndexer, CaptionList, complete_ids, first_bad, missing_captions_error
from deltafm.data.datasets import DataError

__all__ = ["LatentCaptions", "captions_path", "read_shard_captions"]


def captions_path(shard: Path) -> Path | None:
    """``captions-XXXXX.json`` beside ``shard-XXXXX.safetensors`` (None for a shard not named that way)."""
    m = re.fullmatch(r"shard-(\d+)\.safetensors", shard.name)
    return shard.with_name(f"captions-{m.group(1)}.json") if m else None


def _read_side(side: Path, shard: Path, count: int) -> dict[str, Any]:
    """The captions file of ``shard`` (``count`` rows), checked to belong to it."""
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{side}: not a readable captions file ({e}); re-run deltafm prepare-latents") from None
    caps = data.get("captions") if isinstance(data, dict) else None
    if not isinstance(caps, list) or not all(c is None or isinstance(c, str) for c in caps):
        raise DataError(f"{side}: expected a JSON object whose 'captions' is a list of strings or nulls")
    if data.get("shard", shard.name) != shard.name or len(caps) != count:
        raise DataError(f"{side}: holds {len(caps)} captions of {data.get('shard')!r}, but {shard.name} has "
                        f"{count} items; it belongs to another encoding: re-run deltafm prepare-latents")
    return data


def read_shard_captions(paths: list[Path], counts: list[int]) -> tuple[CaptionList, np.ndarray]:
    """(distinct captions, one code per item of the shards ``paths`` in order); items of a shard without a
    captions file have none."""
    texts = CaptionIndexer()
    for path, n in zip(paths, counts):
        side = captions_path(path)
        caps = _read_side(side, path, n)["captions"] if side is not None and side.is_file() else [None] * n
        for c in caps:
            texts.add(c)
    return texts.finish()


class LatentCaptions:
    """``captions``, ``caption_ids``, :meth:`require_captions` and the ``caption`` extra of a latent store (its
    ``paths``, ``_shards``, ``_starts``, ``_rows`` and ``_length``), read from the captions files on first use."""

    _caption_index: tuple[CaptionList, np.ndarray] | None = None  # all items of the shards
    _caption_view: tuple[CaptionList | None, torch.Tensor | None] | None = None  # this view's; reset by subset

    def _caption_state(self) -> tuple[CaptionList, np.ndarray]:
        if self._caption_index is None:
            counts = [s.header.count for s in self._shards]  # type: ignore[attr-defined]
            self._caption_index = read_shard_captions(self.paths, counts)  # type: ignore[attr-defined]
        return self._caption_index

    def _caption_rows(self) -> np.ndarray:
        rows = self._rows  # type: ignore[attr-defined]
        return np.arange(self._length, dtype=np.int64) if rows is None else rows.numpy()  # type: ignore[attr-defined]

    def _captions_of_view(self) -> tuple[CaptionList | None, torch.Tensor | None]:
        if self._caption_view is None:
            texts, codes = self._caption_state()
            ids = complete_ids(codes[self._caption_rows()])
            self._caption_view = (texts, ids) if ids is not None and len(texts) else (None, None)
        return self._caption_view

    @property
    def captions(self) -> CaptionList | None:
        """The distinct captions, when every item has one (else None: see :meth:`require_captions`)."""
        return self._captions_of_view()[0]

    @property
    def caption_ids(self) -> torch.Tensor | None:
        """Each item's index into :attr:`captions` (int64 (N,)), when every item has a caption."""
        return self._captions_of_view()[1]

    def require_captions(self) -> None:
        """Nothing when every item has a caption; else a :class:`DataError` naming the first item without one
        (its shard, row and source name) or the missing captions file."""
        rows = self._caption_rows()
        codes = self._caption_state()[1][rows]
        i = first_bad(codes)
        if i is None:
            return
        starts = self._starts  # type: ignore[attr-defined]
        shard = int(np.searchsorted(starts, rows[i], side="right")) - 1
        path, local = self.paths[shard], int(rows[i] - starts[shard])  # type: ignore[attr-defined]
        side = captions_path(path)
        if side is None or not side.is_file():
            want = side.name if side is not None else "captions-XXXXX.json (shards named shard-XXXXX.safetensors)"
            raise missing_captions_error(codes, f"latent shard {path} has no captions file {want} beside it "
                                                "(deltafm prepare-latents writes one for inputs with captions)")
        names = _read_side(side, path, self._shards[shard].header.count).get("names")  # type: ignore[attr-defined]
        what = "an empty caption" if int(codes[i]) == EMPTY else "no caption"
        shown = f" ({names[local]})" if isinstance(names, list) and local < len(names) else ""
        raise missing_captions_error(codes, f"{side}: item {local}{shown} has {what}")

    def caption_extra(self, index: torch.Tensor) -> torch.Tensor:
        """The caption ids of items ``index`` (the ``caption`` extra); :meth:`require_captions`' error when an
        item has none."""
        ids = self.caption_ids
        if ids is None:
            self.require_captions()
            raise DataError(f"{self}: no captions")  # pragma: no cover - an empty view
        return ids.index_select(0, index)
