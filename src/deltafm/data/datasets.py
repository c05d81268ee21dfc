"""The in-memory dataset type that every loader returns.

Items go to model space with the package's one normalisation (:mod:`deltafm.pixels`)::

    images:  uint8 p ∈ {0, …, 255}  ->  x = p / 127.5 − 1 ∈ [−1, 1]           (:func:`uint8_to_model`)
             inverse for saving:     p = round((x + 1) · 127.5) clipped to [0, 255]  (:func:`model_to_uint8`)
    latents: float, already in model space (the shard loader applied (z − shift) · scale, see latents.py);
             passed through unchanged.

Loaders (idx, digits, folder, latents) import this module; the registry that picks a loader by name is
:mod:`deltafm.data.registry`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch

from deltafm.errors import UserError
from deltafm.pixels import model_to_uint8, uint8_to_model

__all__ = ["DataError", "ImageDataset", "ItemShape"]


class DataError(UserError, ValueError):
    """A dataset cannot be loaded as asked: unknown name or option, or a data file that is damaged or holds
    values the project refuses (the message names the file and what is wrong). A ``ValueError`` as well."""


class ItemShape:
    """What every dataset (in memory, lazy latents, streamed tars) derives from its per-item ``shape``
    (C, H, W), ``labels`` and ``num_classes``: ``channels``, ``image_size`` (square items only) and
    ``class_counts``. Subclasses define ``shape``, ``labels``, ``num_classes`` and ``name``."""

    @property
    def channels(self) -> int:
        return self.shape[0]  # type: ignore[attr-defined]

    @property
    def image_size(self) -> int:
        """Side length H (= W) of the square items."""
        _, h, w = self.shape  # type: ignore[attr-defined]
        if h != w:
            raise ValueError(f"{self.name}: items are {h}x{w}, not square; use .shape")  # type: ignore[attr-defined]
        return h

    def class_counts(self) -> torch.Tensor:
        """Number of items per class, (num_classes,)."""
        return torch.bincount(self.labels.cpu(), minlength=self.num_classes)  # type: ignore[attr-defined]


@dataclass
class ImageDataset(ItemShape):
    """A labelled image (or latent) dataset held in memory as one tensor.

    Attributes:
        images: (N, C, H, W); uint8 pixels for ``kind == "images"``, float for ``kind == "latents"``.
        labels: int64 (N,) class ids in ``[0, num_classes)``.
        num_classes: number of classes (the null class id used for CFG is ``num_classes``).
        name: dataset name, e.g. "fashion-mnist".
        kind: "images" (uint8, normalised on the fly) or "latents" (float, used as stored).
        class_names: optional label names, ``len == num_classes``.
        latent_scale, latent_shift: for latents, model-space z' = (z − shift) · scale; decode with
            z = z' / scale + shift. (1, 0) for images.
        conditions: named per-item class-id conditions beyond the label (e.g. the shapes set's shape,
            colour, size, cell), each int64 (N,) with ids in ``[0, len(condition_values[name]))``.
        condition_values: the value names of each condition (its vocabulary).
        captions: the distinct captions; ``caption_ids`` (int64 (N,)) gives each item's caption.

    Conditions and captions are read per batch like REPA's extras: :meth:`load_extras` with the names
    ``cond.<name>`` (the ids) and ``caption`` (the caption ids).

    ``channels`` and ``image_size`` are derived from ``images``; ``image_size`` requires H == W.
    Indexing ``ds[i]`` returns ``(x, label)`` with x in model space, so the object also works with a
    ``torch.utils.data.DataLoader``; training gathers whole batches with :meth:`load_batch`, the one
    batch method it shares with the lazy :class:`deltafm.data.latent_store.LatentStore` (through
    :class:`deltafm.data.loader.BatchLoader`).
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str
    kind: str = "images"
    class_names: tuple[str, ...] | None = None
    latent_scale: float = 1.0
    latent_shift: float = 0.0
    meta: dict[str, str] = field(default_factory=dict)
    conditions: dict[str, torch.Tensor] = field(default_factory=dict)
    condition_values: dict[str, tuple[str, ...]] = field(default_factory=dict)
    captions: tuple[str, ...] | None = None
    caption_ids: torch.Tensor | None = None
    #: REPA extras this dataset can load: none (pixel data is its own image; see :meth:`load_extras`)
    extra_names: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("images", "latents"):
            raise ValueError(f"kind must be 'images' or 'latents', got {self.kind!r}")
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if self.kind == "images" and self.images.dtype != torch.uint8:
            raise ValueError(f"image datasets hold uint8 pixels, got {self.images.dtype}")
        if self.kind == "latents" and not self.images.dtype.is_floating_point:
            raise ValueError(f"latent datasets hold float tensors, got {self.images.dtype}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be int64 of shape ({self.images.shape[0]},), "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if self.num_classes < 1 and len(self) > 0:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if len(self) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), got range "
                f"[{int(self.labels.min())}, {int(self.labels.max())}]"
            )
        if self.class_names is not None:
            self.class_names = tuple(self.class_names)
            if len(self.class_names) != self.num_classes:
                raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        self._check_conditions()

    def _check_conditions(self) -> None:
        n = len(self)
        if set(self.conditions) != set(self.condition_values):
            raise ValueError(f"conditions {sorted(self.conditions)} and condition_values "
                             f"{sorted(self.condition_values)} must name the same conditions")
        for name, ids in self.conditions.items():
            k = len(self.condition_values[name])
            if ids.dtype != torch.int64 or ids.shape != (n,):
                raise ValueError(f"condition {name!r} must be int64 of shape ({n},), got {ids.dtype} "
                                 f"{tuple(ids.shape)}")
            if n and (int(ids.min()) < 0 or int(ids.max()) >= k):
                raise ValueError(f"condition {name!r} ids must lie in [0, {k}), got "
                                 f"[{int(ids.min())}, {int(ids.max())}]")
        if (self.captions is None) != (self.caption_ids is None):
            raise ValueError("captions and caption_ids go together")
        if self.caption_ids is not None and self.captions is not None:
            if self.caption_ids.dtype != torch.int64 or self.caption_ids.shape != (n,):
                raise ValueError(f"caption_ids must be int64 of shape ({n},)")
            if n and (int(self.caption_ids.min()) < 0 or int(self.caption_ids.max()) >= len(self.captions)):
                raise ValueError(f"caption_ids must index the {len(self.captions)} captions")

    @classmethod
    def from_numpy(
        cls,
        images: np.ndarray,
        labels: np.ndarray,
        num_classes: int,
        name: str,
        class_names: Sequence[str] | None = None,
    ) -> ImageDataset:
        """Build an image dataset from a uint8 array (N, C, H, W) and integer labels (N,)."""
        return cls(
            images=torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
            labels=torch.from_numpy(np.asarray(labels, dtype=np.int64).copy()),
            num_classes=int(num_classes),
            name=name,
            class_names=tuple(class_names) if class_names is not None else None,
        )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.to_model(self.images[index]), self.labels[index]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Per-item shape (C, H, W)."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def to_model(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Items of this dataset -> model space: uint8 -> p/127.5 − 1; latents unchanged (cast to dtype)."""
        if self.kind == "images":
            return uint8_to_model(x, dtype)
        return x.to(dtype)

    def load_batch(
        self, index: torch.Tensor, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Items ``index`` (LongTensor (B,)) in model space, ``to_model(images[index], dtype)``, on the
        device the images live on. ``generator`` is ignored (an in-memory dataset has nothing to draw;
        the argument makes this the same call as :meth:`LatentStore.load_batch`)."""
        index = torch.as_tensor(index, dtype=torch.long).to(self.images.device)
        return self.to_model(self.images.index_select(0, index), dtype)

    @property
    def feature_info(self) -> dict[str, dict[str, Any]]:
        """No stored encoder features (see :meth:`load_extras`)."""
        return {}

    def load_extras(self, index: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per-item extras of items ``index``: ``cond.<name>`` (a condition's ids) and ``caption`` (caption
        ids) when the dataset has them. REPA extras: an in-memory dataset holds none, so any other name is a
        :class:`DataError` (``{}`` for no names). For pixel data x itself is the clean image an encoder
        takes; latents with stored features or images are read by the lazy
        :class:`~deltafm.data.latent_store.LatentStore` (``load_dataset("latents", root)``)."""
        out: dict[str, torch.Tensor] = {}
        index = torch.as_tensor(index, dtype=torch.long)
        rest = []
        for name in names:
            if name.startswith("cond.") and name[5:] in self.conditions:
                ids = self.conditions[name[5:]]
                out[name] = ids.index_select(0, index.to(ids.device))
            elif name == "caption" and self.caption_ids is not None:
                out[name] = self.caption_ids.index_select(0, index.to(self.caption_ids.device))
            else:
                rest.append(name)
        if not rest:
            return out
        names = rest
        if names[0].startswith("cond.") or names[0] == "caption":
            have = [f"cond.{k}" for k in self.conditions] + (["caption"] if self.captions is not None else [])
            raise DataError(f"dataset {self.name!r} has no {names[0]!r}; it has {', '.join(have) or 'no conditions'}")
        hint = ("pixel data carries no extras: run the encoder on x itself" if self.kind == "images" else
                "in-memory latents carry no extras: read the shards with LatentStore (load_dataset('latents', "
                "root)), encoded with `deltafm prepare-latents --encoder PATH` or `--keep-images`")
        raise DataError(f"dataset {self.name!r} has no extras {', '.join(names)}; {hint}")

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> storage space: uint8 pixels for images; for latents the un-scaled VAE latents
        z = x / scale + shift (what a VAE decoder expects)."""
        if self.kind == "images":
            return model_to_uint8(x)
        return x / self.latent_scale + self.latent_shift

    def to(self, device: torch.device | str) -> ImageDataset:
        """A copy with images and labels on ``device`` (batches are then gathered there)."""
        return replace(self, images=self.images.to(device), labels=self.labels.to(device),
                       conditions={k: v.to(device) for k, v in self.conditions.items()},
                       caption_ids=None if self.caption_ids is None else self.caption_ids.to(device))

    def subset(self, indices: torch.Tensor | Sequence[int] | slice) -> ImageDataset:
        """A dataset of the selected items (same classes and metadata)."""
        if not isinstance(indices, slice):
            indices = torch.as_tensor(indices, dtype=torch.long, device=self.images.device)
        return replace(self, images=self.images[indices], labels=self.labels[indices],
                       conditions={k: v[indices] for k, v in self.conditions.items()},
                       caption_ids=None if self.caption_ids is None else self.caption_ids[indices])
