"""The lazy latent dataset: shard headers and labels in memory, item bytes read from disk per batch.

:class:`LatentStore` is what ``load_dataset("latents", root)`` returns and what training reads. On open
it reads every shard's header (:func:`~deltafm.data.latent_format.shard_header`, shards checked to agree
with :func:`~deltafm.data.latent_format.check_shards_agree`), the ``labels`` of every shard (int64, 8
bytes an item: 10 MB for ImageNet's 1.28 M) and the byte offsets of the tensors. Nothing else stays in
memory: :meth:`LatentStore.load_batch` reads the items of a batch with ``os.preadv`` straight from the
shard files into one batch buffer.

Why not ``np.memmap``: pages of a mapping that a process touched count toward its resident set (RSS)
until the kernel reclaims them, so an epoch over a mapped 21 GB ImageNet latent set would grow every
rank's RSS towards 21 GB. Bytes read with ``pread`` land in the kernel's page cache (shared by all ranks,
reclaimable, not RSS) and in the batch buffer; a rank's RSS is its model, its optimizer and a few batches
(see docs/DATA.md, "Lazy latents", for the bound the slow test checks).

Layout read here (the documented safetensors layout, little-endian)::

    bytes [0, 8)            n, the header length, unsigned 64-bit little-endian
    bytes [8, 8 + n)        JSON header: {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"}
    bytes [8 + n + begin, 8 + n + end)   the tensor ``name``, row-major

so item i of ``latents`` (shape (N, C, H, W), e bytes an element) lies at
``8 + n + begin + i·C·H·W·e``. A batch's indices are grouped by shard and sorted; each run of consecutive
items is read with one ``preadv`` into consecutive rows of a staging buffer, which is then put back in
the batch's order.

Model space, as in :mod:`deltafm.data.latents`: with shards holding the posterior mean μ and std σ, and a
generator g given, a batch is

    z = μ + σ · ε,   ε ~ N(0, I) drawn as one ``torch.randn((B, C, H, W), generator=g)`` in batch order,
    x = (z − b) · s                                    (float32 maths, then cast to ``dtype``)

else x = (μ − b) · s, bit-identical to :func:`~deltafm.data.latents.load_latent_shards`. Every read batch
is value-checked (finite μ, finite σ ≥ 0; one vectorised pass); a bad item raises a :class:`DataError`
from :func:`~deltafm.data.latent_format.check_values` naming the shard and the item.

REPA extras (shards written by ``deltafm prepare-latents --encoder PATH`` / ``--keep-images``) are read
the same way, per batch and only when asked, by :meth:`LatentStore.load_extras`::

    "features.<e>"  ->  float32 (B, T, D)   encoder e's patch tokens (stored float16; checked finite)
    "images"        ->  uint8 (B, C, H, W)  the cropped image the VAE encoded (p; model space p/127.5 − 1)

``extra_names`` lists what the shards hold and ``feature_info[e]`` what encoder e's tensor is (its
identity, token grid (gh, gw), dim D, tokens T = gh·gw). Captions (``captions``, ``caption_ids``, the extra
``caption``) come from the ``captions-XXXXX.json`` files beside the shards (:mod:`deltafm.data.latent_captions`).

File descriptors are opened lazily, one per shard and process, and keyed by the process id: a store
pickled to (or forked into) a DataLoader worker opens its own.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltafm.data.datasets import DataError, ItemShape
from deltafm.data.latent_captions import LatentCaptions
from deltafm.data.latent_format import (
    FEATURES_PREFIX,
    RESERVED_KEYS,
    ShardHeader,
    check_shards_agree,
    check_values,
    feature_info,
    meta_number,
    shard_header,
)
from deltafm.data.latents import shard_paths

__all__ = ["LatentStore", "TensorSpan", "tensor_spans"]

_DTYPES = {"F16": torch.float16, "F32": torch.float32, "I64": torch.int64, "U8": torch.uint8}
_MAX_OPEN = 256  # open shard files per process; the oldest is closed beyond this


@dataclass(frozen=True)
class TensorSpan:
    """Where a tensor's bytes lie in a safetensors file: absolute ``start`` offset, ``nbytes``, dtype, shape."""

    start: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def tensor_spans(path: Path) -> dict[str, TensorSpan]:
    """Parse a safetensors file's header (8-byte little-endian length + JSON) into :class:`TensorSpan` s.

    Raises :class:`DataError` naming the file when the header is unreadable, a dtype is not one of F16,
    F32, I64, U8, or the file is shorter than its header says (a truncated copy)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        raw = f.read(n) if 0 < n <= size - 8 else b""
    try:
        header = json.loads(raw)
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise DataError(f"{path}: not a readable safetensors header")
    base, spans = 8 + n, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry.get("dtype") not in _DTYPES:
            raise DataError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')}, expected F16, F32, I64 or U8")
        begin, end = entry["data_offsets"]
        if base + end > size:
            raise DataError(f"{path}: tensor {name!r} ends at byte {base + end} but the file has {size} bytes "
                            "(truncated copy?)")
        spans[name] = TensorSpan(base + begin, end - begin, _DTYPES[entry["dtype"]], tuple(entry["shape"]))
    return spans


@dataclass(frozen=True)
class _Shard:
    header: ShardHeader
    latents: TensorSpan
    std: TensorSpan | None
    labels: TensorSpan
    extras: dict[str, TensorSpan] = field(default_factory=dict)

    def span(self, name: str) -> TensorSpan:
        """The span of tensor ``name`` ("latents", "latents_std" or an extra)."""
        span = {"latents": self.latents, "latents_std": self.std}.get(name) or self.extras.get(name)
        assert span is not None, name
        return span


class LatentStore(LatentCaptions, ItemShape):
    """A latent dataset read lazily from safetensors shards (see the module docstring).

    Duck-types :class:`~deltafm.data.datasets.ImageDataset` for training, sampling and bookkeeping:
    ``len``, ``labels``, ``num_classes``, ``name``, ``kind == "latents"``, ``class_names`` (None),
    ``channels``, ``image_size``, ``shape``, ``latent_scale``, ``latent_shift``, ``meta``, ``subset``,
    ``class_counts``, ``to_model``, ``from_model``, ``ds[i]``, and the one batch path :meth:`load_batch`.
    It has no ``images`` tensor: read items with :meth:`load_batch`, and REPA extras (``extra_names``,
    ``feature_info``) with :meth:`load_extras`.

    Args:
        root: a folder of ``*.safetensors`` shards (read in sorted name order) or one shard file.
        name: the dataset's name.

    Raises:
        FileNotFoundError: no folder or no shards.
        DataError: a damaged header, shards that disagree (item shape, dtype, std present, extras, scale,
            shift, num_classes, VAE, encoders), a label out of range.
    """

    kind = "latents"
    class_names = None

    def __init__(self, root: str | os.PathLike, name: str = "latents") -> None:
        paths = shard_paths(Path(root))
        headers = [shard_header(p) for p in paths]
        check_shards_agree(headers)
        meta0 = headers[0].metadata
        self.name = name
        self.latent_scale = meta_number(paths[0], meta0, "scale_factor", "1.0", positive=True)
        self.latent_shift = meta_number(paths[0], meta0, "shift_factor", "0.0")
        self.meta = {k: v for k, v in meta0.items() if k not in RESERVED_KEYS}
        #: encoder name e (tensor ``features.<e>``) -> {"encoder": e, "tensor": "features.<e>", "identity",
        #: "grid": (gh, gw), "dim": D, "tokens": T = gh·gw}
        self.feature_info: dict[str, dict[str, Any]] = {
            n[len(FEATURES_PREFIX):]: feature_info(paths[0], meta0, n)
            for n in headers[0].extras if n.startswith(FEATURES_PREFIX)}
        self._root = Path(root)
        self._shards = [_open_shard(h) for h in headers]
        labels = [_read_labels(s) for s in self._shards]
        counts = [h.count for h in headers]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        all_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
        if "num_classes" in meta0:
            self.num_classes = int(meta0["num_classes"])
        else:
            self.num_classes = int(all_labels.max()) + 1 if all_labels.numel() else 1
        self.class_names = _class_names(Path(root), self.num_classes)
        self._all_labels = all_labels
        self._rows: torch.Tensor | None = None  # None: items 0 .. len-1 of the shards, in order
        self._length = int(self._starts[-1])
        self.labels = all_labels
        self._pid = os.getpid()
        self._fds: dict[int, int] = {}

    # ------------------------------------------------------------------ what the dataset is
    def __len__(self) -> int:
        return self._length

    @property
    def has_std(self) -> bool:
        """The shards hold the posterior std σ (``latents_std``): batches can be drawn z = μ + σ·ε."""
        return self._shards[0].std is not None

    @property
    def extra_names(self) -> tuple[str, ...]:
        """The REPA extras the shards hold (sorted), e.g. ``("features.dinov2-vitb14", "images")``."""
        return tuple(sorted(self._shards[0].header.extras))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Per-item shape (C, H, W)."""
        c, h, w = self._shards[0].header.item_shape
        return int(c), int(h), int(w)

    @property
    def storage_dtype(self) -> torch.dtype:
        """The shards' dtype (float16 or float32)."""
        return self._shards[0].latents.dtype

    @property
    def paths(self) -> list[Path]:
        return [s.header.path for s in self._shards]

    def to_model(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Latents from :meth:`load_batch` are already in model space: only cast."""
        return x.to(dtype)

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> the un-scaled VAE latents z = x / s + b (what the decoder expects)."""
        return x / self.latent_scale + self.latent_shift

    def subset(self, indices: torch.Tensor | Sequence[int] | slice) -> LatentStore:
        """A store of the selected items (a view: nothing is read). ``slice(0, n)`` keeps the first n."""
        out = object.__new__(LatentStore)
        out.__dict__.update(self.__getstate__())
        out._pid, out._fds, out._caption_view = os.getpid(), {}, None
        if isinstance(indices, slice) and self._rows is None and indices.step in (None, 1):
            start, stop, _ = indices.indices(self._length)
            if start == 0:
                out._length = max(0, stop)
                out.labels = self._all_labels[: out._length]
                return out
        rows = self._rows if self._rows is not None else torch.arange(self._length)
        if isinstance(indices, slice):
            rows = rows[indices]
        else:
            rows = rows[torch.as_tensor(indices, dtype=torch.long)]
        out._rows, out._length = rows.clone(), int(rows.numel())
        out.labels = self._all_labels[out._rows]
        return out

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, label) of one item, x = μ in model space (for a torch DataLoader; training uses load_batch)."""
        i = torch.tensor([int(index)])
        return self.load_batch(i)[0], self.labels[int(index)]

    # ------------------------------------------------------------------ reading
    def load_batch(
        self, index: torch.Tensor, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Items ``index`` (LongTensor (B,)) in model space, (B, C, H, W) of ``dtype`` on the CPU.

        With a std in the shards and a (CPU) ``generator``: x = (μ + σ·ε − b)·s with
        ε = ``torch.randn((B, C, H, W), generator=generator)``; otherwise x = (μ − b)·s. Raises
        :class:`DataError` naming the shard and the item when a read item holds NaN, inf or a negative σ.
        """
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        if index.ndim != 1:
            raise ValueError(f"index must be 1-D, got shape {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self._length):
            raise IndexError(f"index out of range [0, {self._length})")
        rows = (self._rows[index] if self._rows is not None else index).numpy()
        draw = generator is not None and self.has_std
        mu, std = self._read(rows, with_std=draw)
        z = mu.to(torch.float32)
        if draw:
            assert std is not None and generator is not None
            eps = torch.randn(z.shape, generator=generator, dtype=torch.float32)
            z = z + std.to(torch.float32) * eps
        return ((z - self.latent_shift) * self.latent_scale).to(dtype)

    def _read(self, rows: np.ndarray, with_std: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw μ (and σ) of global rows ``rows``, in the order given, checked (see :meth:`_check`)."""
        order, shard, local, bufs = self._read_sorted(rows, ("latents", "latents_std") if with_std else ("latents",))
        mu, std = bufs[0], bufs[1] if with_std else None
        self._check(mu, std, shard, local)
        inv = _inverse(order)
        return mu[inv], None if std is None else std[inv]

    def _read_sorted(
        self, rows: np.ndarray, names: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[torch.Tensor]]:
        """Tensors ``names`` of global rows ``rows`` read in sorted row order: (sort order, shard and local
        index of each sorted row, one (B, *item) buffer of the stored dtype per name). Each run of
        consecutive items of one shard is one ``preadv`` per tensor."""
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        shard = np.searchsorted(self._starts, srt, side="right") - 1
        local = srt - self._starts[shard]
        first = self._shards[0]
        shapes = [self.shape if n in ("latents", "latents_std") else first.header.extras[n] for n in names]
        bufs = [torch.empty((len(rows), *sh), dtype=first.span(n).dtype) for n, sh in zip(names, shapes)]
        items = [int(np.prod(sh)) * b.element_size() for sh, b in zip(shapes, bufs)]
        views = [_bytes_of(b) for b in bufs]
        breaks = np.flatnonzero((np.diff(shard) != 0) | (np.diff(local) != 1)) + 1
        bounds = np.concatenate([[0], breaks, [len(rows)]]).tolist() if len(rows) else []
        for a, b in zip(bounds[:-1], bounds[1:]):
            s, start = int(shard[a]), int(local[a])
            fd, sh = self._fd(s), self._shards[s]
            for name, view, item in zip(names, views, items):
                _pread_into(fd, sh.header.path, view, a * item, b * item, sh.span(name).start + start * item)
        return order, shard, local, bufs

    def load_extras(self, index: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """REPA extras ``names`` of items ``index`` (LongTensor (B,)), in the batch's order, on the CPU:
        ``features.<e>`` float32 (B, T, D) (stored float16, widened exactly), ``images`` uint8 (B, C, H, W);
        and ``caption``, the caption ids int64 (B,) (:mod:`deltafm.data.latent_captions`).

        Read lazily like :meth:`load_batch` (``preadv`` of the batch's rows only). Raises
        :class:`DataError` (a ``ValueError``) for a name the shards do not hold (listing those they
        hold and what to run to add them) and for a feature row holding NaN or inf (naming shard and item).
        """
        caption = "caption" in names  # text conditioning: the items' caption ids (deltafm.data.latent_captions)
        names = tuple(n for n in names if n != "caption")
        missing = [n for n in names if n not in self.extra_names]
        if missing:
            raise DataError(_missing_extras(self._root, missing, self.extra_names))
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        if index.ndim != 1:
            raise ValueError(f"index must be 1-D, got shape {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self._length):
            raise IndexError(f"index out of range [0, {self._length})")
        out = {"caption": self.caption_extra(index)} if caption else {}
        if not names:
            return out
        rows = (self._rows[index] if self._rows is not None else index).numpy()
        order, shard, local, bufs = self._read_sorted(rows, names)
        inv = _inverse(order)
        for name, buf in zip(names, bufs):
            if name.startswith(FEATURES_PREFIX):
                ok = torch.isfinite(buf).flatten(1).all(dim=1)
                if not bool(ok.all()):
                    j = int((~ok).nonzero()[0])
                    raise DataError(f"{self._shards[int(shard[j])].header.path}: {name} of item {int(local[j])} "
                                    "hold NaN or inf; re-encode this shard with `deltafm prepare-latents --encoder`")
                buf = buf.to(torch.float32)
            out[name] = buf[inv]
        return out

    def _check(self, mu: torch.Tensor, std: torch.Tensor | None, shard: np.ndarray, local: np.ndarray) -> None:
        """One vectorised pass: finite μ, finite σ >= 0; the first bad item goes to ``check_values``."""
        ok = torch.isfinite(mu).flatten(1).all(dim=1)
        if std is not None:
            ok &= (torch.isfinite(std) & (std >= 0)).flatten(1).all(dim=1)
        if bool(ok.all()):
            return
        j = int((~ok).nonzero()[0])
        sh, row = self._shards[int(shard[j])], int(local[j])
        label = self._all_labels[int(self._starts[int(shard[j])]) + row].reshape(1)
        check_values(sh.header.path, mu[j:j + 1], None if std is None else std[j:j + 1], label,
                     sh.header.metadata, first_item=row)
        raise DataError(f"{sh.header.path}: item {row} holds a value the project refuses")  # pragma: no cover

    def _fd(self, shard: int) -> int:
        """This process's read-only descriptor of shard ``shard`` (opened on first use)."""
        if self._pid != os.getpid():  # forked: the parent's descriptors are not ours to use
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= _MAX_OPEN:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[shard] = os.open(self._shards[shard].header.path, os.O_RDONLY)
        return fd

    def close(self) -> None:
        """Close this process's shard descriptors (they reopen on the next read)."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fds = {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid, self._fds = os.getpid(), {}

    def __repr__(self) -> str:
        c, h, w = self.shape
        return (f"LatentStore({self.name!r}, {len(self)} items of {c}x{h}x{w} {self.storage_dtype}, "
                f"{len(self._shards)} shards, std={self.has_std}, scale={self.latent_scale}, "
                f"shift={self.latent_shift})")


def _class_names(root: Path, num_classes: int) -> tuple[str, ...] | None:
    """The names in ``root/classes.json`` (written by ``deltafm prepare-latents``: a JSON list in id order)
    when there are ``num_classes`` of them; else None (the names are a convenience, never required)."""
    path = root / "classes.json" if root.is_dir() else root.parent / "classes.json"
    try:
        names = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names)
    return tuple(names) if ok else None


def _open_shard(header: ShardHeader) -> _Shard:
    spans = tensor_spans(header.path)
    lat, std = spans["latents"], spans.get("latents_std")
    if lat.dtype not in (torch.float16, torch.float32):
        raise DataError(f"{header.path}: 'latents' must be float16 or float32, got {lat.dtype}")
    extras = {n: spans[n] for n in header.extras}
    want = {"latents": (header.item_shape, lat.dtype), "latents_std": (header.item_shape, lat.dtype),
            **{n: (shape, torch.float16 if n.startswith(FEATURES_PREFIX) else torch.uint8)
               for n, shape in header.extras.items()}}
    for name, span in (("latents", lat), ("latents_std", std), *extras.items()):
        shape, dtype = want[name]
        nbytes = header.count * int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        if span is not None and (span.nbytes != nbytes or span.dtype != dtype):
            raise DataError(f"{header.path}: {name!r} holds {span.nbytes} bytes of {span.dtype}, expected "
                            f"{nbytes} of {dtype}")
    return _Shard(header, lat, std, spans["labels"], extras)


def _inverse(order: np.ndarray) -> torch.Tensor:
    """The permutation that puts rows read in sorted order (``rows[order]``) back in the asked order."""
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return torch.from_numpy(inverse)


def _missing_extras(root: Path, missing: Sequence[str], held: Sequence[str]) -> str:
    """The error message for extras the shards at ``root`` do not hold: what they hold, what to run."""
    how = []
    if any(n.startswith(FEATURES_PREFIX) for n in missing):
        how.append("`deltafm prepare-latents --encoder PATH` (features.<name>, where name is the encoder's)")
    if "images" in missing:
        how.append("`deltafm prepare-latents --keep-images` (images)")
    unknown = [n for n in missing if n != "images" and not n.startswith(FEATURES_PREFIX)]
    held_text = ", ".join(held) if held else "no extras"
    text = f"the latent shards at {root} do not hold {', '.join(missing)} (they hold {held_text})"
    if unknown:
        text += "; extras are named 'images' or 'features.<encoder name>'"
    if how:
        text += "; encode them into a new folder with " + " or ".join(how)
    return text


def _read_labels(shard: _Shard) -> torch.Tensor:
    """A shard's labels (int64), checked once (>= 0, below the num_classes metadata)."""
    path, span = shard.header.path, shard.labels
    if span.dtype != torch.int64 or span.nbytes != 8 * shard.header.count:
        raise DataError(f"{path}: 'labels' must be int64 ({shard.header.count},), got {span.dtype} {span.shape}")
    labels = torch.empty(shard.header.count, dtype=torch.int64)
    fd = os.open(path, os.O_RDONLY)
    try:
        _pread_into(fd, path, _bytes_of(labels), 0, span.nbytes, span.start)
    finally:
        os.close(fd)
    empty = torch.empty((0, *shard.header.item_shape), dtype=shard.latents.dtype)
    check_values(path, empty, None, labels, shard.header.metadata)
    return labels


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's storage."""
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())  # 1-D uint8: format "B", also for 0 items


def _pread_into(fd: int, path: Path, view: memoryview, pos: int, end: int, offset: int) -> None:
    """Fill ``view[pos:end]`` from byte ``offset`` of ``fd`` (``preadv`` straight into the buffer; looped,
    since the kernel may return fewer bytes); no bytes (a file cut after open) is a :class:`DataError`."""
    while pos < end:
        got = os.preadv(fd, [view[pos:end]], offset)
        if got <= 0:
            raise DataError(f"{path}: read nothing at byte {offset}, expected {end - pos} more (file truncated?)")
        pos, offset = pos + got, offset + got
