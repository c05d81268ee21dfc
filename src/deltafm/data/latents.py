"""Latent datasets stored as safetensors shards (e.g. SD-VAE latents of ImageNet for SiT training).

Shard format (one ``.safetensors`` file per shard, all shards of a dataset in one folder)::

    tensors:   "latents"  float16 or float32, (N_i, C, H, W)   raw VAE latents z, as the encoder emits them
               "labels"   int64, (N_i,)                        class ids
    metadata:  "format": "deltafm.latents", "format_version": "1",
               "scale_factor": s, "shift_factor": b            (decimal strings; same in every shard)
               "num_classes": K                                 (optional; same in every shard)
               any extra string pairs given to the writer (e.g. "vae", "image_size")

Scale convention (chosen once, here): shards keep the **raw** latents and record the scale in their
metadata; the loader returns latents in **model space**

    z' = (z − b) · s          (SD-VAE: s = 0.18215, b = 0, see :data:`SD_VAE_SCALE`)

and stores s and b on the dataset (``latent_scale``, ``latent_shift``), so that
``dataset.from_model(x) = x / s + b`` gives back what the VAE decoder expects. Nothing downstream
multiplies by 0.18215 again. Shards are named ``{prefix}-{index:05d}.safetensors`` and read in sorted
name order; shapes (C, H, W), dtype, scale, shift and num_classes must agree across shards.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import TracebackType

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from deltafm.data.datasets import DataError, ImageDataset

__all__ = [
    "LATENT_FORMAT",
    "SD_VAE_SCALE",
    "LatentShardWriter",
    "load_latent_shards",
    "read_latent_shard",
    "write_latent_shards",
]

#: Scale factor of the Stable Diffusion VAE (sd-vae-ft-ema / -mse) used by the paper's ImageNet setting.
SD_VAE_SCALE = 0.18215
LATENT_FORMAT = "deltafm.latents"
_FORMAT_VERSION = "1"
_RESERVED = ("format", "format_version", "scale_factor", "shift_factor", "num_classes")


class LatentShardWriter:
    """Stream latents and labels into shards of ``shard_size`` items (for encoding large datasets).

    Usage::

        with LatentShardWriter(out_dir, shard_size=10_000, scale_factor=SD_VAE_SCALE, num_classes=1000) as w:
            for images, labels in loader:
                w.add(vae.encode(images).latent_dist.sample(), labels)   # raw latents, not scaled
        paths = w.paths

    Args:
        out_dir: folder to write to (created). It must not already hold ``{prefix}-*.safetensors`` files
            unless ``overwrite`` (which deletes them first), so that old shards never mix with new ones.
        shard_size: items per shard (the last shard may be smaller).
        scale_factor, shift_factor: model-space latents are (z − shift) · scale.
        num_classes: stored in metadata when given; labels are checked against it.
        dtype: storage dtype, torch.float16 (default) or torch.float32.
        prefix: shard file name prefix.
        metadata: extra string key/value pairs stored in every shard.
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
        if not scale_factor > 0:
            raise ValueError(f"scale_factor must be > 0, got {scale_factor}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        extra = dict(metadata or {})
        clash = [k for k in extra if k in _RESERVED]
        if clash:
            raise ValueError(f"metadata keys {clash} are reserved; pass them as arguments")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise ValueError("metadata keys and values must be strings")
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
        self.metadata = {
            "format": LATENT_FORMAT,
            "format_version": _FORMAT_VERSION,
            "scale_factor": repr(float(scale_factor)),
            "shift_factor": repr(float(shift_factor)),
            **({"num_classes": str(int(num_classes))} if num_classes is not None else {}),
            **extra,
        }
        self.paths: list[Path] = []
        self.num_items = 0
        self._item_shape: tuple[int, int, int] | None = None
        self._latents: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._buffered = 0
        self._closed = False

    def add(self, latents: torch.Tensor, labels: torch.Tensor) -> None:
        """Append a batch of raw latents (B, C, H, W) and labels (B,); full shards are written at once."""
        if self._closed:
            raise RuntimeError("writer is closed")
        if latents.ndim != 4 or not latents.dtype.is_floating_point:
            got = f"{latents.dtype} {tuple(latents.shape)}"
            raise ValueError(f"latents must be float (B, C, H, W), got {got}")
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.dtype.is_floating_point or labels.shape[0] != latents.shape[0]:
            raise ValueError(f"labels must be integer ({latents.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")
        shape = tuple(int(s) for s in latents.shape[1:])
        if self._item_shape is None:
            self._item_shape = shape  # type: ignore[assignment]
        elif shape != self._item_shape:
            raise ValueError(f"latent item shape {shape} differs from earlier batches {self._item_shape}")
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("latents hold non-finite values (NaN or inf); check the encoder's output")
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"negative label {int(labels.min())}")
        if self.num_classes is not None and labels.numel() and int(labels.max()) >= self.num_classes:
            raise ValueError(f"label {int(labels.max())} >= num_classes {self.num_classes}")
        self._latents.append(latents.detach().to("cpu", self.dtype))
        self._labels.append(labels.detach().to("cpu", torch.int64))
        self._buffered += latents.shape[0]
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, count: int) -> None:
        latents = torch.cat(self._latents)
        labels = torch.cat(self._labels)
        path = self.out_dir / f"{self.prefix}-{len(self.paths):05d}.safetensors"
        save_file(
            {"latents": latents[:count].contiguous(), "labels": labels[:count].contiguous()},
            str(path),
            metadata=self.metadata,
        )
        self.paths.append(path)
        self.num_items += count
        self._latents, self._labels = [latents[count:]], [labels[count:]]
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
) -> list[Path]:
    """Write raw latents (N, C, H, W) and labels (N,) as shards; see :class:`LatentShardWriter`."""
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
    writer.add(latents, labels)
    return writer.close()


def _shard_header(path: Path) -> tuple[tuple[int, ...], str, int, dict[str, str]]:
    """(item shape, dtype name, item count, metadata) of a shard, read without loading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            if set(f.keys()) != {"latents", "labels"}:
                keys = sorted(f.keys())
                shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
                raise DataError(f"{path}: expected tensors 'latents' and 'labels', found {shown}")
            sl = f.get_slice("latents")
            shape, sdtype = tuple(sl.get_shape()), sl.get_dtype()
    except SafetensorError as err:
        raise DataError(f"{path}: not a readable safetensors file ({err})") from err
    if metadata.get("format") != LATENT_FORMAT:
        found = metadata.get("format")
        raise DataError(f"{path}: metadata 'format' is {found!r}, expected {LATENT_FORMAT!r}")
    if len(shape) != 4:
        raise DataError(f"{path}: 'latents' must be (N, C, H, W), got shape {shape}")
    return shape[1:], sdtype, shape[0], metadata


def _meta_number(path: Path, metadata: dict[str, str], key: str, default: str, positive: bool = False) -> float:
    """A finite number from shard metadata (``positive``: also > 0), or a :class:`DataError` naming the shard."""
    text = metadata.get(key, default)
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or (positive and value <= 0):
        need = "a finite number > 0" if positive else "a finite number"
        raise DataError(f"{path}: metadata {key}={text!r} must be {need}")
    return value


def read_latent_shard(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """Read one shard: (raw latents, labels, metadata), validating format tag, keys, dtypes, shapes and values.

    Values are checked once, here: every latent must be finite (a NaN or inf would otherwise surface much
    later as a non-finite training loss), labels must be >= 0 and below the ``num_classes`` metadata.

    Raises:
        DataError (a ValueError): not a safetensors file, wrong format tag, missing/extra tensors, wrong
            dtype or shape, non-finite latents, labels out of range; the message names the shard.
    """
    path = Path(path)
    _, _, _, metadata = _shard_header(path)
    with safe_open(str(path), framework="pt") as f:
        latents = f.get_tensor("latents")
        labels = f.get_tensor("labels")
    if latents.dtype not in (torch.float16, torch.float32):
        raise DataError(f"{path}: 'latents' must be float16 or float32, got {latents.dtype}")
    if labels.dtype != torch.int64 or labels.shape != (latents.shape[0],):
        raise DataError(
            f"{path}: 'labels' must be int64 ({latents.shape[0]},), got {labels.dtype} {tuple(labels.shape)}"
        )
    finite = torch.isfinite(latents).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise DataError(
            f"{path}: {len(bad)} of {len(latents)} latents hold NaN or inf (first at item {int(bad[0])}); "
            "re-encode this shard (training on it would stop with a non-finite loss)"
        )
    if labels.numel() and int(labels.min()) < 0:
        raise DataError(f"{path}: negative label {int(labels.min())}")
    if "num_classes" in metadata and labels.numel():
        k = int(_meta_number(path, metadata, "num_classes", "1", positive=True))
        if int(labels.max()) >= k:
            raise DataError(f"{path}: label {int(labels.max())} is outside 0..{k - 1} (metadata num_classes={k})")
    return latents, labels, metadata


def _shard_paths(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(
            f"latent folder {root} does not exist; create it with deltafm.data.latents.write_latent_shards "
            "(or `deltafm prepare-latents`)"
        )
    paths = sorted(root.glob("*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"latent folder {root} holds no *.safetensors shards")
    return paths


def load_latent_shards(
    root: str | os.PathLike, dtype: torch.dtype = torch.float32, name: str = "latents"
) -> ImageDataset:
    """Load all shards in folder ``root`` (or one shard file) as a latent :class:`ImageDataset`.

    The returned latents are in model space, (z − shift) · scale, in ``dtype``.

    Raises:
        FileNotFoundError: no folder or no shards.
        DataError (a ValueError): a bad shard (see :func:`read_latent_shard`: also NaN/inf latents and
            out-of-range labels), or shards that disagree on item shape, dtype, scale, shift or num_classes.
    """
    paths = _shard_paths(Path(root))
    # Pass 1: headers only (shapes, dtypes, metadata) to validate and size the output.
    headers = [_shard_header(p) for p in paths]
    shape0, dtype0, _, meta0 = headers[0]
    for path, (shape, sdtype, _, meta) in zip(paths[1:], headers[1:]):
        if shape != shape0:
            raise DataError(f"{path}: item shape {shape} differs from {paths[0].name}'s {shape0}")
        if sdtype != dtype0:
            raise DataError(f"{path}: dtype {sdtype} differs from {paths[0].name}'s {dtype0}")
        for key in ("scale_factor", "shift_factor", "num_classes"):
            if meta.get(key) != meta0.get(key):
                raise DataError(
                    f"{path}: metadata {key}={meta.get(key)!r} differs from {paths[0].name}'s {meta0.get(key)!r}"
                )
    scale = _meta_number(paths[0], meta0, "scale_factor", "1.0", positive=True)
    shift = _meta_number(paths[0], meta0, "shift_factor", "0.0")
    # Pass 2: fill one preallocated tensor, converting shard by shard to keep peak memory low.
    total = sum(h[2] for h in headers)
    latents = torch.empty((total, *shape0), dtype=dtype)
    labels = torch.empty((total,), dtype=torch.int64)
    start = 0
    for path in paths:
        z, y, _ = read_latent_shard(path)
        stop = start + z.shape[0]
        latents[start:stop] = ((z.to(torch.float32) - shift) * scale).to(dtype)
        labels[start:stop] = y
        start = stop
    if "num_classes" in meta0:
        num_classes = int(meta0["num_classes"])
    else:
        num_classes = int(labels.max()) + 1 if labels.numel() else 1
    extra = {k: v for k, v in meta0.items() if k not in _RESERVED}
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
