"""The item layout of ``deltafm prepare-latents`` and the loop that crops, encodes and writes shards.

**Items.** Source image i is item i, or with ``flip`` items 2i (as it is) and 2i + 1 (its horizontal
mirror, taken after the crop, as REPA's and DiT's flip augmentation does). Shard k holds the items
[k·S, (k+1)·S) (S = shard size; the last shard may be shorter), encoded in batches of B items that start
at the shard's start, so a shard's bytes depend on neither the number of processes nor which process made
it. An unreadable image is an error, or with ``skip_bad`` it is left out of its shard (its name recorded
in the shard's metadata ``skipped``, which ``OUT/skipped.txt`` is assembled from); the number of images
smaller than the crop (upsampled) is recorded as ``upsampled``.

Images are read, decoded and cropped by :class:`BatchReader`, a map-style dataset indexed by a whole batch
of items (a list), so a ``torch.utils.data.DataLoader`` with workers prepares batches in parallel, in
order; each image is decoded once per batch even with flips.

**REPA extras** (``ShardJob.extras``, :mod:`deltafm.prepare.features`): the same batch x = p / 127.5 − 1
that the VAE encodes goes through each encoder (``features.<name>``, float16), and the uint8 crop p is
kept as ``images`` when asked; a flipped item's extras are those of the mirrored crop.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from deltafm.atomic import atomic_write
from deltafm.data.crop import MODES, crop_to_array
from deltafm.data.image_sources import Source, UnreadableImage
from deltafm.data.latent_format import write_latent_shard
from deltafm.pixels import uint8_to_model

if TYPE_CHECKING:
    from deltafm.prepare.features import Extras
    from deltafm.vae.autoencoder import Autoencoder

__all__ = ["STOP_ENV", "Layout", "Batch", "BatchReader", "ShardJob", "encode_shards", "shard_name", "captions_name"]

#: test hook: a process stops (as if killed) after writing this many shards
STOP_ENV = "DELTAFM_PREPARE_STOP_AFTER"


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def captions_name(k: int) -> str:
    return f"captions-{k:05d}.json"


@dataclass(frozen=True)
class Layout:
    """Which items make up which shard and batch."""

    images: int
    flip: bool
    shard_size: int
    batch_size: int

    @property
    def count(self) -> int:
        """Items: images, twice that with flips."""
        return self.images * (2 if self.flip else 1)

    @property
    def num_shards(self) -> int:
        return -(-self.count // self.shard_size)

    def shard_items(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.count))

    def batches(self, k: int) -> list[list[int]]:
        """The batches of shard ``k`` (lists of items), the first starting at the shard's start."""
        items = self.shard_items(k)
        return [list(items[i: i + self.batch_size]) for i in range(0, len(items), self.batch_size)]

    def source_of(self, item: int) -> tuple[int, bool]:
        """(source image, flipped) of an item."""
        return (item // 2, bool(item % 2)) if self.flip else (item, False)


@dataclass
class Batch:
    """A batch as read: the pixels of the readable items, those items, the unreadable ones."""

    items: list[int]
    pixels: torch.Tensor  # uint8 (len(items), C, S, S)
    bad: list[tuple[int, str, str]] = field(default_factory=list)  # (item, image name, message)
    upsampled: int = 0  # images (not flipped copies) smaller than the crop


class BatchReader(torch.utils.data.Dataset):
    """``reader[items]`` -> :class:`Batch`: decode, convert, ADM-crop (and mirror) the batch's images."""

    def __init__(self, source: Source, layout: Layout, image_size: int, channels: int) -> None:
        self.source, self.layout = source, layout
        self.image_size, self.channels = image_size, channels

    def __len__(self) -> int:
        return self.layout.count

    def __getitem__(self, items: list[int]) -> Batch:  # type: ignore[override]
        kept, arrays, bad, small = [], [], [], 0
        last: tuple[int, np.ndarray | str] | None = None
        for item in items:
            src, flipped = self.layout.source_of(item)
            if last is None or last[0] != src:
                try:
                    img = self.source.open_image(src, MODES[self.channels])
                    small += int(min(img.size) < self.image_size and not flipped)
                    last = (src, crop_to_array(img, self.image_size, self.channels))
                except UnreadableImage as e:
                    last = (src, str(e))
            if isinstance(last[1], str):
                bad.append((item, self.source.name(src), last[1]))
                continue
            kept.append(item)
            arrays.append(last[1][:, :, ::-1] if flipped else last[1])
        if not arrays:
            return Batch(kept, torch.empty((0, self.channels, self.image_size, self.image_size), dtype=torch.uint8),
                         bad, small)
        pixels = torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))
        return Batch(kept, pixels, bad, small)


def _identity(x: Any) -> Any:
    return x


@dataclass
class ShardJob:
    """Everything one process needs to write its shards."""

    out: Path
    source: Source
    layout: Layout
    ae: Autoencoder
    image_size: int
    channels: int
    metadata: dict[str, str]  # shard_metadata(...) shared by every shard
    storage_dtype: torch.dtype
    skip_bad: bool = False
    workers: int = 0
    extras: Extras | None = None  # REPA features / images stored with the latents (None: none)


def _loader(job: ShardJob, shards: list[int]) -> torch.utils.data.DataLoader:
    batches = [b for k in shards for b in job.layout.batches(k)]
    reader = BatchReader(job.source, job.layout, job.image_size, job.channels)
    extra: dict[str, Any] = {"prefetch_factor": 2, "persistent_workers": False} if job.workers > 0 else {}
    return torch.utils.data.DataLoader(reader, sampler=batches, batch_size=None, num_workers=job.workers,
                                       collate_fn=_identity, **extra)


def _bad_input(bad: tuple[int, str, str]) -> UnreadableImage:
    return UnreadableImage(f"{bad[2]}. Remove (or replace) this file, or pass --skip-bad to leave unreadable "
                           "images out (they are listed in OUT/skipped.txt); shards already written are kept")


#: one encoded batch: (μ, σ, items, extras)
_Part = tuple[torch.Tensor, torch.Tensor, list[int], dict[str, torch.Tensor]]


def _write_shard(job: ShardJob, k: int, parts: list[_Part], skipped: list[str], upsampled: int) -> Path:
    """Write shard k (captions first, so that an existing shard always has its captions)."""
    c, h, w = job.ae.latent_shape(job.image_size)
    items = [i for p in parts for i in p[2]]
    empty = torch.empty((0, c, h, w), dtype=job.storage_dtype)
    mu = torch.cat([p[0] for p in parts]) if parts else empty
    sd = torch.cat([p[1] for p in parts]) if parts else empty
    extras: dict[str, torch.Tensor] = {}
    if job.extras is not None and job.extras.any:
        extras = ({n: torch.cat([p[3][n] for p in parts]) for n in job.extras.names()} if parts
                  else job.extras.empty(job.channels, job.image_size))
    sources = [job.layout.source_of(i) for i in items]
    labels = torch.as_tensor(job.source.labels[[s for s, _ in sources]], dtype=torch.int64).reshape(-1)
    if job.source.has_captions:
        side = {"shard": shard_name(k), "names": [job.source.relative_name(s) for s, _ in sources],
                "flipped": [f for _, f in sources], "captions": [job.source.caption(s) for s, _ in sources]}
        text = json.dumps(side, ensure_ascii=False, indent=0).encode()
        atomic_write(job.out / captions_name(k), lambda tmp: tmp.write_bytes(text))
    meta = {**job.metadata, "upsampled": str(upsampled)}
    if skipped:
        meta["skipped"] = json.dumps(list(dict.fromkeys(skipped)), ensure_ascii=False)
    return write_latent_shard(job.out / shard_name(k), mu, labels, meta, std=sd, dtype=job.storage_dtype,
                              extras=extras)


class _Stopped(RuntimeError):
    """Raised by the test hook :data:`STOP_ENV` (stands for a kill)."""


def encode_shards(job: ShardJob, shards: list[int], progress: Callable[[int], None] | None = None) -> list[Path]:
    """Crop, encode and write ``shards`` (shard indices) one after the other; returns the files written.

    Raises:
        UnreadableImage: an image cannot be decoded and ``job.skip_bad`` is off (shards finished before
            it are kept).
        EncoderError: an encoder's features are not finite in float16 (likewise).
    """
    stop_after = int(os.environ.get(STOP_ENV, "0") or 0)
    written: list[Path] = []
    if not shards:
        return written
    batches = iter(_loader(job, shards))
    device = job.ae.device
    for k in shards:
        parts: list[_Part] = []
        skipped: list[str] = []
        upsampled = 0
        for _ in job.layout.batches(k):
            b: Batch = next(batches)
            if b.bad and not job.skip_bad:
                raise _bad_input(b.bad[0])
            skipped += [name for _, name, _ in b.bad]
            upsampled += b.upsampled
            if b.items:
                x = uint8_to_model(b.pixels.to(device))
                mu, sd = job.ae.encode_moments(x)
                extras = job.extras.compute(x, b.pixels) if job.extras is not None and job.extras.any else {}
                parts.append((mu.to("cpu", job.storage_dtype), sd.to("cpu", job.storage_dtype), b.items, extras))
            if progress is not None:
                progress(len(b.items) + len(b.bad))
        written.append(_write_shard(job, k, parts, skipped, upsampled))
        if stop_after and len(written) >= stop_after:
            raise _Stopped(f"{STOP_ENV}={stop_after}: stopping after {len(written)} shard(s)")
    return written
