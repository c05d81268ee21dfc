"""The latent shard format: one owner for writing, reading headers, reading and validating a shard.

See :mod:`deltafm.data.latents` for the format itself (tensors ``latents``, optional ``latents_std``,
``labels``, optional REPA extras ``features.<name>`` and ``images``; metadata ``format``,
``format_version``, ``scale_factor``, ``shift_factor``, ``num_classes``, ``vae``, ...). Writers (the
streaming :class:`~deltafm.data.latents.LatentShardWriter`,
``deltafm prepare-latents``) call :func:`shard_metadata` and :func:`write_latent_shard`; readers (the
in-memory loader, the lazy :mod:`deltafm.data.latent_store`) call :func:`shard_header`,
:func:`check_shards_agree` and :func:`read_latent_moments`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from deltafm.atomic import atomic_write
from deltafm.data.datasets import DataError

__all__ = [
    "LATENT_FORMAT",
    "FORMAT_VERSION",
    "RESERVED_KEYS",
    "SHARED_KEYS",
    "SD_VAE_SCALE",
    "ShardHeader",
    "shard_metadata",
    "write_latent_shard",
    "shard_header",
    "check_shards_agree",
    "meta_number",
    "read_latent_moments",
    "check_moments",
    "check_extras",
    "feature_metadata",
    "feature_info",
    "FEATURES_PREFIX",
    "IMAGES",
]

#: Scale factor of the Stable Diffusion VAE (sd-vae-ft-ema / -mse) used by the paper's ImageNet setting.
SD_VAE_SCALE = 0.18215
LATENT_FORMAT = "deltafm.latents"
FORMAT_VERSION = "2"
#: Metadata keys set by the writer's arguments, not by ``metadata=``.
RESERVED_KEYS = ("format", "format_version", "scale_factor", "shift_factor", "num_classes")
#: Metadata keys that must be equal in every shard of a dataset (when any shard has them).
SHARED_KEYS = ("scale_factor", "shift_factor", "num_classes", "vae", "image_size")
_TENSORS_V1 = {"latents", "labels"}
_TENSORS_V2 = {"latents", "latents_std", "labels"}
#: REPA extras: ``features.<name>`` (float16 (N, T, D) encoder patch tokens) and ``images`` (uint8 (N, C, H, W))
FEATURES_PREFIX = "features."
IMAGES = "images"
#: safetensors dtype of each kind of extra, and its torch dtype
_EXTRA_DTYPES = {"features": ("F16", torch.float16), "images": ("U8", torch.uint8)}
#: per-encoder metadata keys: ``features.<name>.identity``, ``.grid`` ("gh,gw"), ``.dim``
FEATURE_KEYS = ("identity", "grid", "dim")


def _extra_kind(name: str) -> str | None:
    """"features" for ``features.<name>`` (non-empty name), "images" for ``images``, else None."""
    if name == IMAGES:
        return "images"
    if name.startswith(FEATURES_PREFIX) and len(name) > len(FEATURES_PREFIX):
        return "features"
    return None


def feature_metadata(name: str, identity: str, grid: tuple[int, int], dim: int) -> dict[str, str]:
    """The metadata of tensor ``features.<name>``: ``{features.<name>.identity: identity,
    features.<name>.grid: "gh,gw", features.<name>.dim: "D"}`` (T = gh·gw tokens of D values an item)."""
    key = f"{FEATURES_PREFIX}{name}"
    if _extra_kind(key) != "features" or not identity:
        raise ValueError(f"need an encoder name and identity, got name={name!r}, identity={identity!r}")
    gh, gw = (int(g) for g in grid)
    if gh < 1 or gw < 1 or int(dim) < 1:
        raise ValueError(f"{key}: grid {grid} and dim {dim} must be >= 1")
    return {f"{key}.identity": str(identity), f"{key}.grid": f"{gh},{gw}", f"{key}.dim": str(int(dim))}


def shard_metadata(
    scale_factor: float = 1.0,
    shift_factor: float = 0.0,
    num_classes: int | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, str]:
    """The metadata of a shard: format tag and version, scale, shift, num_classes and the extra pairs.

    Raises:
        ValueError: scale not > 0 or not finite, shift not finite, num_classes < 1, reserved or non-string
            extra keys.
    """
    if not (math.isfinite(scale_factor) and scale_factor > 0):
        raise ValueError(f"scale_factor must be a finite number > 0, got {scale_factor}")
    if not math.isfinite(shift_factor):
        raise ValueError(f"shift_factor must be finite, got {shift_factor}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    extra = dict(metadata or {})
    clash = [k for k in extra if k in RESERVED_KEYS]
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved; pass them as arguments")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise ValueError("metadata keys and values must be strings")
    return {
        "format": LATENT_FORMAT,
        "format_version": FORMAT_VERSION,
        "scale_factor": repr(float(scale_factor)),
        "shift_factor": repr(float(shift_factor)),
        **({"num_classes": str(int(num_classes))} if num_classes is not None else {}),
        **extra,
    }


def check_moments(
    latents: torch.Tensor, labels: torch.Tensor, std: torch.Tensor | None = None, num_classes: int | None = None
) -> None:
    """Validate a batch before it is written: float (B, C, H, W) latents (and std of the same shape, >= 0),
    integer (B,) labels in range, every value finite. Raises ``ValueError`` saying what is wrong."""
    if latents.ndim != 4 or not latents.dtype.is_floating_point:
        raise ValueError(f"latents must be float (B, C, H, W), got {latents.dtype} {tuple(latents.shape)}")
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.shape[0] != latents.shape[0]:
        raise ValueError(f"labels must be integer ({latents.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")
    if not bool(torch.isfinite(latents).all()):
        raise ValueError("latents hold non-finite values (NaN or inf); check the encoder's output")
    if std is not None:
        if std.shape != latents.shape:
            raise ValueError(f"latents_std must have the latents' shape {tuple(latents.shape)}, got {tuple(std.shape)}")
        if not bool(torch.isfinite(std).all()) or bool((std < 0).any()):
            raise ValueError("latents_std holds negative or non-finite values; check the encoder's output")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"negative label {int(labels.min())}")
    if num_classes is not None and labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(f"label {int(labels.max())} >= num_classes {num_classes}")


def check_extras(extras: dict[str, torch.Tensor], count: int, metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """Validate REPA extras before they are written; returns them as stored (CPU, contiguous).

    ``features.<name>``: float (count, T, D), cast to float16; every value must be finite *after* the
    cast (|v| > 65504 overflows to inf), and ``metadata`` must hold :func:`feature_metadata` of the encoder
    with gh·gw = T and dim = D. ``images``: uint8 (count, C, H, W). Raises ``ValueError`` naming the
    tensor (and the encoder, from ``features.<name>.identity``).
    """
    out = {}
    for name, t in extras.items():
        kind = _extra_kind(name)
        if kind is None:
            raise ValueError(f"extra tensor {name!r}: expected 'images' or 'features.<encoder name>'")
        if t.shape[:1] != (count,):
            raise ValueError(f"{name}: {tuple(t.shape)} does not hold one row per item ({count})")
        if kind == "images":
            if t.ndim != 4 or t.dtype != torch.uint8:
                raise ValueError(f"images must be uint8 (N, C, H, W), got {t.dtype} {tuple(t.shape)}")
            out[name] = t.detach().to("cpu").contiguous()
            continue
        if t.ndim != 3 or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be float (N, T, D), got {t.dtype} {tuple(t.shape)}")
        meta = [metadata.get(f"{name}.{k}") for k in FEATURE_KEYS]
        if None in meta:
            raise ValueError(f"{name}: metadata needs {[f'{name}.{k}' for k in FEATURE_KEYS]} (see feature_metadata)")
        grid = tuple(int(g) for g in str(meta[1]).split(","))
        if len(grid) != 2 or grid[0] * grid[1] != t.shape[1] or int(str(meta[2])) != t.shape[2]:
            raise ValueError(f"{name}: (tokens, dim) {tuple(t.shape[1:])} disagree with grid {meta[1]}, dim {meta[2]}")
        half = t.detach().to("cpu", torch.float16).contiguous()
        bad = int((~torch.isfinite(half)).sum())
        if bad:
            raise ValueError(f"{name}: {bad} value(s) of encoder {meta[0]} are NaN or inf in float16 (|v| > 65504 "
                             "overflows); check the encoder's output")
        out[name] = half
    return out


def write_latent_shard(
    path: str | os.PathLike,
    latents: torch.Tensor,
    labels: torch.Tensor,
    metadata: dict[str, str],
    std: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float16,
    extras: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write one shard atomically (temporary sibling ``path.tmp``, fsync, rename): a shard file that exists
    is complete, so an interrupted writer never leaves a half shard that a reader would count.

    ``metadata`` comes from :func:`shard_metadata` (plus :func:`feature_metadata` of each encoder);
    ``std`` (the posterior std) and ``extras`` (``features.<name>``, ``images``) are optional. Values are
    checked with :func:`check_moments` and :func:`check_extras` first (``ValueError``).
    """
    if dtype not in (torch.float16, torch.float32):
        raise ValueError(f"dtype must be torch.float16 or torch.float32, got {dtype}")
    labels = torch.as_tensor(labels)
    num_classes = int(metadata["num_classes"]) if "num_classes" in metadata else None
    check_moments(latents, labels, std, num_classes)
    tensors = {
        "latents": latents.detach().to("cpu", dtype).contiguous(),
        "labels": labels.detach().to("cpu", torch.int64).contiguous(),
    }
    if std is not None:
        tensors["latents_std"] = std.detach().to("cpu", dtype).contiguous()
    tensors.update(check_extras(dict(extras or {}), int(latents.shape[0]), metadata))
    data = canonical_safetensors(tensors, metadata)
    return atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))


def canonical_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors bytes of ``tensors`` with a canonical header (sorted keys, no spaces, padded with
    spaces to 8 bytes as the format asks), so equal content gives equal files whichever process wrote it
    (safetensors itself may order the metadata differently from run to run)."""
    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + raw[8 + n :]


@dataclass(frozen=True)
class ShardHeader:
    """What a shard's header says, read without loading its tensors. ``extras``: REPA extra tensor name ->
    per-item shape ((T, D) for ``features.<name>``, (C, H, W) for ``images``); empty in plain shards."""

    path: Path
    item_shape: tuple[int, int, int]
    dtype: str
    count: int
    has_std: bool
    metadata: dict[str, str]
    extras: dict[str, tuple[int, ...]] = field(default_factory=dict)


def shard_header(path: str | os.PathLike) -> ShardHeader:
    """Read and check a shard's header (format tag, tensor names, shapes, extras and their metadata); a
    :class:`DataError` names the file."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            keys = set(f.keys())
            extras = {k for k in keys if _extra_kind(k) is not None}
            if keys - extras not in (_TENSORS_V1, _TENSORS_V2):
                names = sorted(keys)
                shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
                raise DataError(f"{path}: expected tensors 'latents' and 'labels' (and optionally 'latents_std', "
                                f"'features.<encoder>', 'images'), found {shown}")
            sl = f.get_slice("latents")
            shape, sdtype = tuple(sl.get_shape()), sl.get_dtype()
            label_shape = tuple(f.get_slice("labels").get_shape())
            std_shape = tuple(f.get_slice("latents_std").get_shape()) if "latents_std" in keys else shape
            extra = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in sorted(extras)}
    except SafetensorError as err:
        raise DataError(f"{path}: not a readable safetensors file ({err})") from err
    if metadata.get("format") != LATENT_FORMAT:
        raise DataError(f"{path}: metadata 'format' is {metadata.get('format')!r}, expected {LATENT_FORMAT!r}")
    if len(shape) != 4:
        raise DataError(f"{path}: 'latents' must be (N, C, H, W), got shape {shape}")
    if label_shape != (shape[0],) or std_shape != shape:
        raise DataError(f"{path}: 'labels' {label_shape} / 'latents_std' {std_shape} do not match 'latents' {shape}")
    items = {name: _extra_item_shape(path, name, dt, sh, shape[0], metadata) for name, (dt, sh) in extra.items()}
    return ShardHeader(path, shape[1:], sdtype, shape[0], "latents_std" in keys, metadata, items)  # type: ignore[arg-type]


def _extra_item_shape(
    path: Path, name: str, dtype: str, shape: tuple[int, ...], count: int, metadata: dict[str, str]
) -> tuple[int, ...]:
    """Check an extra tensor's header entry (dtype, rank, one row per item, feature metadata); its item shape."""
    kind = _extra_kind(name)
    assert kind is not None
    want, rank = _EXTRA_DTYPES[kind][0], 3 if kind == "features" else 4
    if dtype != want or len(shape) != rank or shape[0] != count:
        form = "(N, T, D)" if kind == "features" else "(N, C, H, W)"
        raise DataError(f"{path}: {name!r} must be {want} {form} with N = {count} items, got {dtype} {shape}")
    if kind == "features":
        info = feature_info(path, metadata, name)
        if info["tokens"] != shape[1] or info["dim"] != shape[2]:
            raise DataError(f"{path}: {name!r} holds {shape[1]} tokens of {shape[2]} values, but its metadata says "
                            f"grid {info['grid']} and dim {info['dim']}")
    return shape[1:]


def feature_info(path: Path, metadata: dict[str, str], name: str) -> dict[str, Any]:
    """What a shard's metadata says of extra ``features.<enc>``: ``{"encoder": enc, "tensor":
    "features.<enc>", "identity": str, "grid": (gh, gw), "dim": D, "tokens": gh·gw}``; a :class:`DataError`
    names the shard and the bad key."""
    values = {k: metadata.get(f"{name}.{k}") for k in FEATURE_KEYS}
    try:
        grid = tuple(int(g) for g in str(values["grid"]).split(","))
        dim = int(str(values["dim"]))
        ok = bool(values["identity"]) and len(grid) == 2 and min(grid) >= 1 and dim >= 1
    except ValueError:
        ok = False
    if not ok:
        raise DataError(f"{path}: {name!r} needs metadata {name}.identity, {name}.grid ('gh,gw') and {name}.dim "
                        f"(> 0), got {values}; re-encode with `deltafm prepare-latents --encoder ...`")
    return {"encoder": name[len(FEATURES_PREFIX):], "tensor": name, "identity": values["identity"], "grid": grid,
            "dim": dim, "tokens": grid[0] * grid[1]}


def check_shards_agree(headers: list[ShardHeader]) -> None:
    """Shards of one dataset must agree on item shape, dtype, presence of ``latents_std``, the extras they
    hold (names and item shapes), every ``features.*`` metadata value (the encoders) and every
    :data:`SHARED_KEYS` metadata value: a :class:`DataError` names the first shard that differs."""
    first = headers[0]
    for h in headers[1:]:
        for what, a, b in (("item shape", h.item_shape, first.item_shape), ("dtype", h.dtype, first.dtype),
                           ("'latents_std' present", h.has_std, first.has_std), ("extras", h.extras, first.extras)):
            if a != b:
                raise DataError(f"{h.path}: {what} {a} differs from {first.path.name}'s {b}")
        feats = sorted({k for m in (h.metadata, first.metadata) for k in m if k.startswith(FEATURES_PREFIX)})
        for key in (*SHARED_KEYS, *feats):
            if h.metadata.get(key) != first.metadata.get(key):
                what = "VAE" if key == "vae" else f"metadata {key}"
                raise DataError(
                    f"{h.path}: {what}={h.metadata.get(key)!r} differs from {first.path.name}'s "
                    f"{first.metadata.get(key)!r}; shards of different autoencoders, encoders, scales or sizes "
                    "cannot be mixed: re-encode them with one VAE, or keep them in separate folders"
                )


def meta_number(path: Path, metadata: dict[str, str], key: str, default: str, positive: bool = False) -> float:
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


def check_values(
    path: Path, latents: torch.Tensor, std: torch.Tensor | None, labels: torch.Tensor,
    metadata: dict[str, str], first_item: int = 0,
) -> None:
    """Value checks of items read from a shard (finite latents and std, std >= 0, labels in range); a
    :class:`DataError` names the shard and the item (``first_item`` is the index of the first row)."""
    if latents.dtype not in (torch.float16, torch.float32):
        raise DataError(f"{path}: 'latents' must be float16 or float32, got {latents.dtype}")
    if labels.dtype != torch.int64:
        raise DataError(f"{path}: 'labels' must be int64, got {labels.dtype}")
    for name, t in (("latents", latents), ("latents_std", std)):
        if t is None:
            continue
        ok = torch.isfinite(t).flatten(1).all(dim=1)
        if name == "latents_std":
            ok &= (t >= 0).flatten(1).all(dim=1)
        if not bool(ok.all()):
            bad = (~ok).nonzero().flatten()
            raise DataError(
                f"{path}: {len(bad)} of {len(t)} {name} hold NaN or inf{' or negative values' if t is std else ''} "
                f"(first at item {first_item + int(bad[0])}); re-encode this shard with "
                "`deltafm prepare-latents` (training on it would stop with a non-finite loss)"
            )
    if labels.numel() and int(labels.min()) < 0:
        raise DataError(f"{path}: negative label {int(labels.min())}")
    if "num_classes" in metadata and labels.numel():
        k = int(meta_number(path, metadata, "num_classes", "1", positive=True))
        if int(labels.max()) >= k:
            raise DataError(f"{path}: label {int(labels.max())} is outside 0..{k - 1} (metadata num_classes={k})")


def read_latent_moments(
    path: str | os.PathLike,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, dict[str, str]]:
    """Read and validate a whole shard: (raw latents or posterior mean, posterior std or None, labels,
    metadata). Raises :class:`DataError` naming the shard (see :func:`shard_header`, :func:`check_values`)."""
    header = shard_header(path)
    with safe_open(str(header.path), framework="pt") as f:
        latents = f.get_tensor("latents")
        labels = f.get_tensor("labels")
        std = f.get_tensor("latents_std") if header.has_std else None
    check_values(header.path, latents, std, labels, header.metadata)
    return latents, std, labels, header.metadata
