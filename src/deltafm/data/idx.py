"""IDX files (the MNIST / Fashion-MNIST format): a strict numpy reader and a small writer.

Layout of an IDX file (all integers big-endian)::

    bytes 0-1   0x00 0x00
    byte  2     dtype code: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64
    byte  3     number of dimensions d (1 for labels, 3 for images)
    4*d bytes   the size of each dimension as uint32
    rest        prod(sizes) items of the dtype, row-major

Files may be gzip-compressed; that is detected from the gzip magic bytes ``1f 8b``, never from the file
name. Every header field and the payload length are checked, and a bad file raises :class:`IdxFormatError`
that names the file and what is wrong with it.

The datasets (MNIST, Fashion-MNIST) are four files in one folder::

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

:func:`load_idx_dataset` finds them in any folder (either compression) and returns an
:class:`~deltafm.data.datasets.ImageDataset` of uint8 images shaped (N, 1, H, W).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from deltafm.data.datasets import DataError, ImageDataset

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "IdxFormatError",
    "find_idx_files",
    "load_idx_dataset",
    "parse_idx",
    "read_idx",
    "write_idx",
]

#: Where the Debian package ``dataset-fashion-mnist`` installs the four IDX files.
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")

#: Fashion-MNIST label names, in label order 0..9.
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_GZIP_MAGIC = b"\x1f\x8b"

#: IDX dtype code -> numpy dtype as stored (big-endian).
_CODE_TO_DTYPE: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_KIND_TO_CODE: dict[tuple[str, int], int] = {
    ("u", 1): 0x08,
    ("i", 1): 0x09,
    ("i", 2): 0x0B,
    ("i", 4): 0x0C,
    ("f", 4): 0x0D,
    ("f", 8): 0x0E,
}

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


class IdxFormatError(DataError):
    """A file is not a valid IDX file (bad magic, dtype code, dimensions or length)."""


def parse_idx(raw: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an (uncompressed) IDX file into a native-endian numpy array.

    Args:
        raw: the whole file content.
        source: a name for error messages.

    Raises:
        IdxFormatError: on a wrong magic number, an unknown dtype code, zero dimensions, or a payload whose
            length is not exactly ``prod(dims) * itemsize``.
    """
    if len(raw) < 4:
        raise IdxFormatError(f"{source}: {len(raw)} bytes is too short for an IDX header (need at least 4)")
    if raw[0] != 0 or raw[1] != 0:
        raise IdxFormatError(f"{source}: bad IDX magic number {raw[:4].hex()} (the first two bytes must be 00 00)")
    code, ndim = raw[2], raw[3]
    if code not in _CODE_TO_DTYPE:
        known = ", ".join(f"0x{c:02X}" for c in _CODE_TO_DTYPE)
        raise IdxFormatError(f"{source}: unknown IDX dtype code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise IdxFormatError(f"{source}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise IdxFormatError(
            f"{source}: truncated header: {ndim} dimensions need {header_len} header bytes, file has {len(raw)}"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _CODE_TO_DTYPE[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        kind = "truncated" if actual < expected else "has trailing bytes"
        raise IdxFormatError(
            f"{source}: payload {kind}: dims {dims} of {dtype.name} need {expected} bytes after the "
            f"{header_len}-byte header, found {actual}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzip-compressed or plain (detected by the gzip magic bytes), into numpy.

    Raises:
        FileNotFoundError: the file does not exist.
        IdxFormatError: the content is not valid IDX, or the gzip stream is corrupt or truncated.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:  # BadGzipFile is an OSError; a cut stream raises EOFError
            raise IdxFormatError(f"{path}: corrupt or truncated gzip stream ({err})") from err
    return parse_idx(raw, source=str(path))


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file (used by tests and to export data).

    Args:
        path: target file.
        array: any array of uint8, int8, int16, int32, float32 or float64 with at least one dimension.
        compress: gzip the file; ``None`` means "if the name ends with .gz".
    """
    path = Path(path)
    array = np.asarray(array)
    key = (array.dtype.kind, array.dtype.itemsize)
    if key not in _KIND_TO_CODE or array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"cannot store an array of dtype {array.dtype} and {array.ndim} dims as IDX")
    code = _KIND_TO_CODE[key]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = np.ascontiguousarray(array, dtype=_CODE_TO_DTYPE[code]).tobytes()
    data = header + payload
    if compress is None:
        compress = path.name.endswith(".gz")
    if compress:
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def _expected_names(split: str) -> tuple[str, str]:
    prefix = _SPLIT_PREFIX[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _missing_message(root: Path, what: str) -> str:
    names = [n for s in ("train", "test") for n in _expected_names(s)]
    listing = "\n".join(f"    {n}[.gz]" for n in names)
    return (
        f"{what}\nAn IDX dataset (MNIST / Fashion-MNIST) is a folder holding these four files, gzip "
        f"or plain:\n{listing}\n"
        "Get Fashion-MNIST with `apt-get install dataset-fashion-mnist` (installs them into "
        f"{FASHION_MNIST_ROOT}), or download the four IDX files of the dataset into a folder DIR and pass "
        "data.root=DIR (root=DIR in Python)."
    )


def find_idx_files(root: str | os.PathLike, split: str = "train") -> tuple[Path, Path]:
    """Return the (images, labels) paths of ``split`` ("train" or "test") in folder ``root``.

    Each file may be named with or without ``.gz``; if both exist, the plain file is used.

    Raises:
        DataError (a ValueError): unknown split.
        FileNotFoundError: the folder or a file is missing; the message lists the expected files and how to
            get them.
    """
    if split not in _SPLIT_PREFIX:
        raise DataError(f"unknown split {split!r}; expected one of {sorted(_SPLIT_PREFIX)}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(_missing_message(root, f"IDX dataset folder {root} does not exist."))
    found = []
    for name in _expected_names(split):
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                found.append(candidate)
                break
        else:
            raise FileNotFoundError(_missing_message(root, f"{root} has no {name} or {name}.gz (split {split!r})."))
    return found[0], found[1]


def load_idx_dataset(
    root: str | os.PathLike,
    split: str = "train",
    name: str = "idx",
    class_names: tuple[str, ...] | None = None,
    num_classes: int | None = None,
) -> ImageDataset:
    """Load one split of an MNIST-format dataset from folder ``root`` as uint8 images (N, 1, H, W).

    Args:
        root: folder with the IDX files (see the module docstring for names).
        split: "train" (``train-*``) or "test" (``t10k-*``).
        name: dataset name stored on the result.
        class_names: optional label names; fixes ``num_classes`` to their count.
        num_classes: number of classes; default ``len(class_names)`` or ``max(label) + 1``.

    Raises:
        FileNotFoundError: missing folder or file (message says what is expected and how to get it).
        IdxFormatError: a file is corrupt, or images and labels disagree (count, rank, dtype, range).
    """
    images_path, labels_path = find_idx_files(root, split)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise IdxFormatError(
            f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise IdxFormatError(f"{labels_path}: expected integer labels of shape (N,), got {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise IdxFormatError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels"
        )
    if class_names is not None:
        num_classes = len(class_names)
    if labels.size and labels.min() < 0:
        raise IdxFormatError(f"{labels_path}: negative label {int(labels.min())}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    elif labels.size and int(labels.max()) >= num_classes:
        raise IdxFormatError(f"{labels_path}: label {int(labels.max())} >= num_classes {num_classes}")
    return ImageDataset.from_numpy(
        images[:, None],
        labels,
        num_classes=num_classes,
        name=name,
        class_names=class_names,
    )
