"""Samples streamed to disk in chunks, resumable after a kill, assembled into an ``.npz`` without holding them.

A :class:`ChunkStore` is a work folder (``OUT/.sampling/`` for ``deltafm sample``) holding::

    settings.json              what produces the samples (checkpoint, solver, steps, cfg, seed, num, ...);
                               written first, atomically
    chunk_000000000000.npy     samples start .. start+count-1 (one batch), written atomically
    lock                       held (flock) while a process, or the rank 0 of a torchrun job, writes here

Each chunk is written to a temporary name, flushed, fsync'ed and renamed into place, so a chunk file
either holds a whole batch or does not exist; a kill leaves at most a ``*.tmp`` file, which never
counts and is removed by the next open. Reopening the store with the same settings keeps every finished
chunk (each is checked against the expected shape, dtype and size); other settings are a
:class:`SampleStoreError` naming the differences, never a mix of two runs. Under torchrun only rank 0
opens (and locks) the store; every rank writes the chunks :meth:`ChunkStore.deal` gives it.

:func:`write_npz` writes an ``.npz`` entry by entry from chunk iterables (``.npy`` header from numpy's
format helpers, then the raw bytes, into an uncompressed zip64 member with a fixed timestamp), so
``np.load(path)[name]`` is the array ``np.savez`` would have stored, the file is the same bytes for the
same content, and memory stays bounded by one copy block. :func:`write_final` writes the final files of a
finished store (grids, the npz, sample.json).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write, exclusive_lock
from .errors import UserError

__all__ = ["SampleStoreError", "ChunkStore", "write_npz", "write_final", "npy_header"]

_CHUNK_RE = re.compile(r"^chunk_(\d{12})\.npy$")
_BLOCK = 1 << 22  # bytes copied at a time
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamp: same content, same bytes


class SampleStoreError(UserError, OSError):
    """The output folder cannot be used: other settings, another writer, or a failed write."""


def _atomic_write(path: Path, write) -> None:
    """Call ``write(fileobj)`` on ``path.tmp`` and rename it onto ``path`` (:func:`deltafm.atomic.atomic_write`:
    a failed write leaves nothing); an OS error becomes a :class:`SampleStoreError` naming the file."""

    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    try:
        atomic_write(path, fill)
    except OSError as e:
        raise SampleStoreError(f"cannot write {path}: {e}") from None


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, data offset) of the ``.npy`` file open at its start."""
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return tuple(shape), bool(fortran), np.dtype(dtype), f.tell()


def npy_header(dtype: np.dtype, shape: Sequence[int]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of ``dtype`` and ``shape``."""
    import io

    buf = io.BytesIO()
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
         "shape": tuple(int(s) for s in shape)}
    try:
        np.lib.format.write_array_header_1_0(buf, d)
    except ValueError:  # header longer than 64 KiB: format 2.0 (as np.save does)
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


def write_npz(path: str | Path, entries: Mapping[str, tuple[np.dtype, Sequence[int], Iterable[Any]]]) -> Path:
    """Write an ``.npz`` whose member ``name`` holds the C-ordered array of ``dtype`` and ``shape`` made by
    concatenating the parts of its iterable along axis 0 (parts: numpy arrays, or ``(file, offset)`` to copy
    the rest of a file from ``offset``). Atomic (temporary file + rename); checks every member's size."""
    path = Path(path)

    def write(f) -> None:
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, (dtype, shape, parts) in entries.items():
                dtype = np.dtype(dtype)
                expect = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
                with zf.open(info, "w", force_zip64=True) as member:
                    member.write(npy_header(dtype, shape))
                    written = 0
                    for part in parts:
                        written += _write_part(member, part, dtype)
                if written != expect:
                    raise ValueError(f"npz member {name}: wrote {written} bytes, expected {expect}")

    _atomic_write(path, write)
    return path


def write_final(store: ChunkStore, out: Path, labels: np.ndarray, meta: dict[str, Any], images: bool,
                num_classes: int, class_names: Sequence[str] | None = None) -> str:
    """The final files of a finished store in ``out``: for images the grids (from the first images), then
    ``samples.npz`` assembled from the chunks, then sample.json (last); for latents ``latents.npz`` and
    sample.json. Returns a one-line summary."""
    from .images import sample_info, write_grids, write_meta

    lab = np.asarray(labels, dtype=np.int64)
    n = store.num
    if not images:
        write_npz(out / "latents.npz", {"arr_0": (np.float32, (n, *store.item_shape), store.parts()),
                                        "labels": (np.int64, (n,), [lab])})
        write_meta(out / "sample.json", meta)
        return f"wrote {n} latents to {out / 'latents.npz'} (decode them with the VAE used to encode)"
    paths = write_grids(out, store.take, lab)
    write_npz(out / "samples.npz", {"arr_0": (np.uint8, (n, *store.item_shape), store.parts()),
                                    "labels": (np.int64, (n,), [lab])})
    write_meta(out / "sample.json", sample_info(meta, n, num_classes, class_names))
    return f"wrote {n} samples: {paths['grid']}, {out / 'samples.npz'} and {len(np.unique(lab))} class grid(s)"


def _write_part(out, part: Any, dtype: np.dtype) -> int:
    if isinstance(part, tuple):  # (file path, offset): stream the file's bytes in blocks
        src, offset = part
        n = 0
        with open(src, "rb") as f:
            f.seek(offset)
            while block := f.read(_BLOCK):
                out.write(block)
                n += len(block)
        return n
    a = np.ascontiguousarray(part, dtype=dtype)
    out.write(a.tobytes())
    return a.nbytes


class ChunkStore:
    """Chunks of ``num`` items of ``item_shape`` / ``dtype``, ``chunk_size`` items each (the last may be short).

    Args:
        root: the work folder (created by :meth:`open`).
        settings: JSON-able description of what produces the items; a reopen must match it exactly.
    """

    def __init__(self, root: str | Path, settings: Mapping[str, Any], num: int, chunk_size: int,
                 item_shape: Sequence[int], dtype: np.dtype | str) -> None:
        if num < 1 or chunk_size < 1:
            raise ValueError(f"num and chunk_size must be >= 1, got {num}, {chunk_size}")
        self.root = Path(root)
        self.settings = json.loads(json.dumps(dict(settings), allow_nan=False))
        self.num, self.chunk_size = int(num), int(chunk_size)
        self.item_shape = tuple(int(s) for s in item_shape)
        self.dtype = np.dtype(dtype)
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------------------------------ layout
    @property
    def starts(self) -> range:
        return range(0, self.num, self.chunk_size)

    def count(self, start: int) -> int:
        return min(self.chunk_size, self.num - start)

    def path(self, start: int) -> Path:
        return self.root / f"chunk_{start:012d}.npy"

    def deal(self, done: Iterable[int], rank: int = 0, world: int = 1) -> list[int]:
        """The chunks (starts) rank ``rank`` of ``world`` writes: the chunks not in ``done``, in order, dealt
        round-robin (the i-th to rank i mod world). On a fresh store chunk k goes to rank k mod world."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0 .. {world - 1}")
        done = set(done)
        return [s for s in self.starts if s not in done][rank::world]

    # ------------------------------------------------------------------------------------------ state
    def differences(self) -> list[str]:
        """Settings that differ from those recorded in the folder (empty when none is recorded)."""
        f = self.root / "settings.json"
        if not f.is_file():
            return []
        try:
            old = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return ["settings.json (unreadable)"]
        keys = list(self.settings) + [k for k in old if k not in self.settings]
        return [f"{k}: {json.dumps(old.get(k))} there, {json.dumps(self.settings.get(k))} now"
                for k in keys if old.get(k) != self.settings.get(k)]

    def check(self) -> None:
        """Raise :class:`SampleStoreError` when the folder records other settings (changes nothing)."""
        diff = self.differences()
        if diff:
            raise SampleStoreError(f"{self.root} holds an unfinished sampling run with other settings ("
                                   + "; ".join(diff) + "). Rerun with the same settings to continue it, use "
                                   f"another --out, or delete {self.root} to start over")

    def open(self, warn=None) -> list[int]:
        """Create or reopen the folder (locked for this process); returns the starts of finished chunks.

        Raises :class:`SampleStoreError` when it records other settings or another process holds it."""
        self.check()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SampleStoreError(f"cannot create {self.root}: {e}") from None
        self._lock()
        if not (self.root / "settings.json").is_file():
            self._clear()  # chunks without settings cannot be trusted
            _atomic_write(self.root / "settings.json",
                          lambda f: f.write(json.dumps(self.settings, indent=1, allow_nan=False).encode()))
        for p in self.root.glob("*.tmp"):
            p.unlink()
        done = []
        for p in sorted(self.root.glob("chunk_*")):
            m = _CHUNK_RE.match(p.name)
            start = int(m.group(1)) if m else -1
            if start in self.starts and self._valid(p, start):
                done.append(start)
            else:
                if warn is not None:
                    warn(f"discarding {p} (not a finished chunk of this run)")
                p.unlink()
        return done

    def missing(self) -> list[int]:
        """Starts of the chunks not (validly) on disk; changes nothing (any process may ask)."""
        return [s for s in self.starts if not self._valid(self.path(s), s)]

    def _valid(self, p: Path, start: int) -> bool:
        try:
            with open(p, "rb") as f:
                shape, fortran, dtype, offset = _read_header(f)
        except (OSError, ValueError):
            return False
        want = (self.count(start), *self.item_shape)
        size = offset + int(np.prod(want, dtype=np.int64)) * self.dtype.itemsize
        return shape == want and not fortran and dtype == self.dtype and p.stat().st_size == size

    def _lock(self) -> None:
        try:
            self._lock_fd = exclusive_lock(self.root / "lock")
        except BlockingIOError:
            raise SampleStoreError(f"another process is writing samples into {self.root}; wait for it or "
                                   "use another --out") from None

    def _clear(self) -> None:
        for p in self.root.iterdir():
            if p.name != "lock":
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    # ------------------------------------------------------------------------------------------ I/O
    def write(self, start: int, items: np.ndarray) -> Path:
        """Write the chunk starting at ``start`` (atomically)."""
        want = (self.count(start), *self.item_shape)
        if start not in self.starts or tuple(items.shape) != want:
            raise ValueError(f"chunk at {start}: expected shape {want}, got {tuple(items.shape)}")
        a = np.ascontiguousarray(items, dtype=self.dtype)
        path = self.path(start)
        _atomic_write(path, lambda f: np.save(f, a, allow_pickle=False))
        return path

    def parts(self) -> Iterator[tuple[Path, int]]:
        """``(file, data offset)`` of every chunk in order, for :func:`write_npz`."""
        for start in self.starts:
            p = self.path(start)
            with open(p, "rb") as f:
                offset = _read_header(f)[3]
            yield p, offset

    def take(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Items at ``indices`` (any order), read through memory maps one chunk at a time."""
        idx = np.asarray(indices, dtype=np.int64)
        out = np.empty((idx.size, *self.item_shape), dtype=self.dtype)
        chunk_of = idx // self.chunk_size
        for c in np.unique(chunk_of):
            sel = np.flatnonzero(chunk_of == c)
            start = int(c) * self.chunk_size
            m = np.load(self.path(start), mmap_mode="r")
            out[sel] = m[idx[sel] - start]
            del m
        return out

    def remove(self) -> None:
        """Delete the folder once the final files are written: chunks first, settings.json last, so a
        kill halfway leaves a store that still reopens (missing chunks are simply sampled again)."""
        for p in sorted(self.root.glob("chunk_*")):
            p.unlink()
        for name in ("settings.json", "lock"):
            (self.root / name).unlink(missing_ok=True)
        self.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
