"""Latent datasets stored as safetensors shards (e.g. SD-VAE latents of ImageNet for SiT training).

Shard format (one ``.safetensors`` file per shard, all shards of a dataset in one folder)::

    tensors:   "latents"      float16 or float32, (N_i, C, H, W)  raw VAE latents z as the encoder emits
                                                                  them, or the posterior mean μ
               "latents_std"  same dtype and shape (optional)     posterior std σ; when present a training
                                                                  step draws z = μ + σ·ε, ε ~ N(0, I),
                                                                  afresh each time (as REPA does)
               "labels"       int64, (N_i,)                       class ids
               "features.<e>" float16, (N_i, T, D)  (optional)    REPA targets: encoder e's patch tokens
                                                                  of the clean cropped image item i was
                                                                  encoded from (the mirrored image for a
                                                                  flipped copy), T = gh·gw raster order;
                                                                  every value finite after the fp16 cast
               "images"       uint8, (N_i, C, H, W)  (optional)   that cropped image itself (to run an
                                                                  encoder on the fly while training)
    metadata:  "format": "deltafm.latents", "format_version": "2" ("1": no "latents_std"; still read),
               "scale_factor": s, "shift_factor": b            (decimal strings; same in every shard)
               "num_classes": K                                 (optional; same in every shard)
               "vae": identity of the autoencoder (optional; shards of two VAEs never mix)
               "features.<e>.identity", "features.<e>.grid" ("gh,gw"), "features.<e>.dim" ("D")
                                                                (one triple per encoder; same in every shard)
               any extra string pairs given to the writer (e.g. "image_size", "flip")

Scale convention (chosen once, here): shards keep the **raw** latents and record the scale in their
metadata; the loaders return latents in **model space**

    z' = (z − b) · s          (SD-VAE: s = 0.18215, b = 0, see :data:`SD_VAE_SCALE`)

and store s and b on the dataset (``latent_scale``, ``latent_shift``), so that
``dataset.from_model(x) = x / s + b`` gives back what the VAE decoder expects. Nothing downstream
multiplies by 0.18215 again. Shards are named ``{prefix}-{index:05d}.safetensors`` and read in sorted
name order; shapes (C, H, W), dtype, the presence of ``latents_std``, the extras held (names, item
shapes, encoder metadata) and the metadata keys of :data:`SHARED_KEYS` must agree across shards. Each
shard file is written atomically (:func:`write_latent_shard`), so a shard that exists is complete. The
in-memory :func:`load_latent_shards` ignores the extras; the lazy
:class:`~deltafm.data.latent_store.LatentStore` reads them (``load_extras``).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

import torch

from deltafm.data.datasets import ImageDataset
from deltafm.data.latent_format import (
    LATENT_FORMAT,
    RESERVED_KEYS,
    SD_VAE_SCALE,
    check_extras,
    check_moments,
    check_shards_agree,
    meta_number,
    read_latent_moments,
    shard_header,
    shard_metadata,
    write_latent_shard,
)

__all__ = [
    "LATENT_FORMAT",
    "SD_VAE_SCALE",
    "LatentShardWriter",
    "load_latent_shards",
    "read_latent_shard",
    "shard_paths",
    "write_latent_shards",
]


class LatentShardWriter:
    """Stream latents (and optionally their posterior std) and labels into shards of ``shard_size`` items.

    Usage::

        with LatentShardWriter(out_dir, shard_size=10_000, scale_factor=SD_VAE_SCALE, num_classes=1000) as w:
            for images, labels in loader:
                post = vae.encode(images).latent_dist
                w.add(post.mean, labels, std=post.std)        # raw moments, not scaled
        paths = w.paths

    (``deltafm prepare-latents`` does this for image folders and tar shards, resumably and under torchrun.)

    Args:
        out_dir: folder to write to (created). It must not already hold ``{prefix}-*.safetensors`` files
            unless ``overwrite`` (which deletes them first), so that old shards never mix with new ones.
        shard_size: items per shard (the last shard may be smaller).
        scale_factor, shift_factor: model-space latents are (z − shift) · scale.
        num_classes: stored in metadata when given; labels are checked against it.
        dtype: storage dtype, torch.float16 (default) or torch.float32.
        prefix: shard file name prefix.
        metadata: extra string key/value pairs stored in every shard (e.g. ``"vae"``, and
            :func:`~deltafm.data.latent_format.feature_metadata` of each encoder whose features are added).

    REPA extras (``features.<name>`` (B, T, D), ``images`` uint8 (B, C, H, W)) go with :meth:`add`'s
    ``extras``; every batch must give the same extra names.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        shard_size: int = 10_000,
        scale_factor: float = 1.0,
        shift_factor: float = 0.0,
        num_classes: int | None = None,
        dtype: torch.dtype = torch.float16,
        prefix: str = "shard",
        metadata: dict[str, str] | None = None,
        overwrite: bool = False,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if dtype not in (torch.float16, torch.float32):
            raise ValueError(f"dtype must be torch.float16 or torch.float32, got {dtype}")
        self.metadata = shard_metadata(scale_factor, shift_factor, num_classes, metadata)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.out_dir.glob(f"{prefix}-*.safetensors"))
        if existing:
            if not overwrite:
                raise FileExistsError(
                    f"{self.out_dir} already holds {len(existing)} shard(s) named {prefix}-*.safetensors; "
                    "choose an empty folder or pass overwrite=True"
                )
            for p in existing:
                p.unlink()
        self.shard_size = shard_size
        self.dtype = dtype
        self.prefix = prefix
        self.num_classes = num_classes
        self.paths: list[Path] = []
        self.num_items = 0
        self._item_shape: tuple[int, int, int] | None = None
        self._with_std: bool | None = None
        self._extra_names: tuple[str, ...] | None = None
        self._parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor]]] = []
        self._buffered = 0
        self._closed = False

    def add(
        self, latents: torch.Tensor, labels: torch.Tensor, std: torch.Tensor | None = None,
        extras: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Append a batch of raw latents (B, C, H, W) (or posterior means with ``std``), labels (B,) and
        optional REPA ``extras`` (:func:`~deltafm.data.latent_format.check_extras`); full shards are
        written at once."""
        if self._closed:
            raise RuntimeError("writer is closed")
        labels = torch.as_tensor(labels)
        check_moments(latents, labels, std, self.num_classes)
        extra = check_extras(dict(extras or {}), int(latents.shape[0]), self.metadata)
        shape = tuple(int(s) for s in latents.shape[1:])
        if self._item_shape is None:
            self._item_shape, self._with_std = shape, std is not None  # type: ignore[assignment]
            self._extra_names = tuple(sorted(extra))
        elif shape != self._item_shape:
            raise ValueError(f"latent item shape {shape} differs from earlier batches {self._item_shape}")
        elif (std is not None) != self._with_std:
            raise ValueError("give std with every batch or with none")
        elif tuple(sorted(extra)) != self._extra_names:
            raise ValueError(f"extras {sorted(extra)} differ from earlier batches' {list(self._extra_names or ())}")
        cpu = (latents.detach().to("cpu", self.dtype), None if std is None else std.detach().to("cpu", self.dtype),
               labels.detach().to("cpu", torch.int64), extra)
        self._parts.append(cpu)
        self._buffered += latents.shape[0]
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, count: int) -> None:
        latents = torch.cat([p[0] for p in self._parts])
        std = torch.cat([p[1] for p in self._parts]) if self._with_std else None  # type: ignore[misc]
        labels = torch.cat([p[2] for p in self._parts])
        extras = {k: torch.cat([p[3][k] for p in self._parts]) for k in self._extra_names or ()}
        path = self.out_dir / f"{self.prefix}-{len(self.paths):05d}.safetensors"
        write_latent_shard(path, latents[:count], labels[:count], self.metadata,
                           std=None if std is None else std[:count], dtype=self.dtype,
                           extras={k: v[:count] for k, v in extras.items()})
        self.paths.append(path)
        self.num_items += count
        self._parts = [(latents[count:], None if std is None else std[count:], labels[count:],
                        {k: v[count:] for k, v in extras.items()})]
        self._buffered -= count

    def close(self) -> list[Path]:
        """Write the remaining items as a last (smaller) shard; returns all shard paths."""
        if not self._closed:
            if self._buffered:
                self._flush(self._buffered)
            self._closed = True
        return self.paths

    def __enter__(self) -> LatentShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()


def write_latent_shards(
    out_dir: str | os.PathLike,
    latents: torch.Tensor,
    labels: torch.Tensor,
    shard_size: int = 10_000,
    scale_factor: float = 1.0,
    shift_factor: float = 0.0,
    num_classes: int | None = None,
    dtype: torch.dtype = torch.float16,
    prefix: str = "shard",
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
    std: torch.Tensor | None = None,
    extras: dict[str, torch.Tensor] | None = None,
) -> list[Path]:
    """Write raw latents (N, C, H, W) (or posterior means with ``std``), labels (N,) and optional REPA
    ``extras`` (``features.<name>`` (N, T, D), ``images`` uint8 (N, C, H, W)) as shards; see
    :class:`LatentShardWriter`."""
    writer = LatentShardWriter(
        out_dir,
        shard_size=shard_size,
        scale_factor=scale_factor,
        shift_factor=shift_factor,
        num_classes=num_classes,
        dtype=dtype,
        prefix=prefix,
        metadata=metadata,
        overwrite=overwrite,
    )
    writer.add(latents, labels, std=std, extras=extras)
    return writer.close()


def read_latent_shard(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """Read one shard: (raw latents or posterior means, labels, metadata), validated (format tag, keys,
    dtypes, shapes, finite values, labels in range); a :class:`DataError` names the shard. See
    :func:`deltafm.data.latent_format.read_latent_moments` for the std as well."""
    latents, _, labels, metadata = read_latent_moments(path)
    return latents, labels, metadata


def shard_paths(root: Path) -> list[Path]:
    """The shard files of a latent folder (sorted), or of ``root`` itself when it is one file."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(
            f"latent folder {root} does not exist; create it with `deltafm prepare-latents` "
            "(or deltafm.data.latents.write_latent_shards)"
        )
    paths = sorted(root.glob("*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"latent folder {root} holds no *.safetensors shards")
    return paths


def load_latent_shards(
    root: str | os.PathLike, dtype: torch.dtype = torch.float32, name: str = "latents"
) -> ImageDataset:
    """Load all shards in folder ``root`` (or one shard file) into memory as a latent :class:`ImageDataset`.

    The returned latents are the stored latents (posterior means where the shards hold a std) in model
    space, (z − shift) · scale, in ``dtype``. For datasets larger than memory, and to draw z = μ + σ·ε per
    step, use the lazy :class:`deltafm.data.latent_store.LatentStore` (what training uses).

    Raises:
        FileNotFoundError: no folder or no shards.
        DataError (a ValueError): a bad shard (NaN/inf latents, out-of-range labels, ...), or shards that
            disagree on item shape, dtype, scale, shift, num_classes or VAE.
    """
    paths = shard_paths(Path(root))
    headers = [shard_header(p) for p in paths]
    check_shards_agree(headers)
    meta0 = headers[0].metadata
    scale = meta_number(paths[0], meta0, "scale_factor", "1.0", positive=True)
    shift = meta_number(paths[0], meta0, "shift_factor", "0.0")
    total = sum(h.count for h in headers)
    latents = torch.empty((total, *headers[0].item_shape), dtype=dtype)
    labels = torch.empty((total,), dtype=torch.int64)
    start = 0
    for path in paths:  # shard by shard into one preallocated tensor, to keep peak memory low
        z, _, y, _ = read_latent_moments(path)
        stop = start + z.shape[0]
        latents[start:stop] = ((z.to(torch.float32) - shift) * scale).to(dtype)
        labels[start:stop] = y
        start = stop
    if "num_classes" in meta0:
        num_classes = int(meta0["num_classes"])
    else:
        num_classes = int(labels.max()) + 1 if labels.numel() else 1
    extra = {k: v for k, v in meta0.items() if k not in RESERVED_KEYS}
    return ImageDataset(
        images=latents,
        labels=labels,
        num_classes=num_classes,
        name=name,
        kind="latents",
        latent_scale=scale,
        latent_shift=shift,
        meta=extra,
    )
