"""Image sources read at random: image folders and webdataset tar shards, indexed once (used by
``deltafm prepare-latents`` and by the streamed training dataset ``webdataset``, :mod:`deltafm.data.streamed`).

An input is enumerated into a fixed, sorted list of items (image i: where its bytes are, its label, its
name for messages); nothing but that index is kept in memory, and any item can be read at random, so the
order is the same on every run and every rank and a killed run resumes where it stopped.

* **Class folder** ``ROOT/<class>/**/<image>`` (ImageNet: ``ROOT/train/<wnid>/*.JPEG``; a ``ROOT/train``
  folder is used when there is one): class ids are the positions of the subfolder names in sorted order,
  images are found recursively and ordered by their path inside the class folder (names starting with
  "." are skipped), as :mod:`deltafm.data.folder` does.
* **Plain folder** ``ROOT/<image>`` (no class subfolders, or any folder with ``unlabelled``): every image
  found recursively, ordered by relative path, label 0, one class.
* **Webdataset tars** (a brace pattern ``data/shard-{000..009}.tar``, a folder of ``*.tar``, or a list of
  files): members are grouped by key (the member name up to the first dot of its base name); a sample's
  image is its ``jpg`` / ``jpeg`` / ``png`` / ``webp`` member, its label the integer text of ``cls`` or the
  field ``label`` of ``json`` (a ``json`` without ``label`` gives none), its caption the ``txt`` member or
  else the string field ``caption`` of ``json`` (img2dataset's CC3M layout: ``KEY.jpg``, ``KEY.txt``,
  ``KEY.json``). The tars are taken in the order given (a folder's in sorted name order) and the samples of
  a tar in sorted key order. Members are located once with :mod:`tarfile` (data offset and size) and read
  later with ``os.pread``; the tars must be uncompressed (random access).

Captions (:mod:`deltafm.data.captions`) are read while indexing, with no image decoded: a folder image's is
the text file with its stem beside it (``img.png`` + ``img.txt``), a tar sample's as above. ``captions``
holds the distinct captions and ``caption_codes`` each item's index into them (negative: none or empty).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deltafm.data.captions import EMPTY, CaptionIndexer, CaptionList, folder_captions, folder_problem
from deltafm.data.folder import IMAGE_EXTENSIONS
from deltafm.data.tar_samples import ImageSourceError, UnreadableImage, label_and_caption, scan_tar

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["ImageSourceError", "UnreadableImage", "Source", "DatasetSource", "FolderSource", "TarSource",
           "TAR_IMAGE_EXTENSIONS", "expand_braces", "open_source", "restrict"]

#: image members of a webdataset sample, in order of preference
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` lists and ``{000..009}`` numeric ranges (zero padding kept), left to right, as
    webdataset does: ``shard-{0..2}.tar`` -> ``shard-0.tar, shard-1.tar, shard-2.tar``."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        if hi < lo:
            raise ImageSourceError(f"--input {pattern}: range {{{body}}} runs backwards")
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        choices = [str(k).zfill(width) for k in range(lo, hi + 1)]
    else:
        choices = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [out for c in choices for out in expand_braces(head + c + tail)]


class Source:
    """An enumerated input: ``len(source)`` images, each with a label, a name and maybe a caption."""

    kind = "?"
    description = ""
    class_names: list[str] | None = None
    num_classes = 1
    labels: np.ndarray
    #: the distinct captions, and each item's index into them (< 0: none, see deltafm.data.captions)
    captions: CaptionList = CaptionList()
    caption_codes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        """The image's path (folder) or ``TAR:MEMBER`` (tar), for messages and ``skipped.txt``."""
        raise NotImplementedError

    def relative_name(self, i: int) -> str:
        """The name without the location of the input (for the fingerprint of the enumeration)."""
        raise NotImplementedError

    def read(self, i: int) -> bytes | Path:
        """The encoded image (bytes) or its file."""
        raise NotImplementedError

    @property
    def has_captions(self) -> bool:
        """Some item has a caption."""
        return self.caption_codes is not None and bool((self.caption_codes >= 0).any())

    def caption(self, i: int) -> str | None:
        """Item i's caption (stripped), or None when it has none (or an empty one)."""
        code = -1 if self.caption_codes is None else int(self.caption_codes[i])
        return self.captions[code] if code >= 0 else None

    def caption_problem(self, i: int) -> str:
        """What is wrong with the caption of item i (one without a usable caption), naming the item."""
        return f"{self.name(i)} has no caption"

    def open_image(self, i: int, mode: str = "RGB") -> Image.Image:
        """The decoded image converted to ``mode`` (``RGB`` or ``L``; the first frame of an animation), or an
        :class:`UnreadableImage` naming it."""
        from PIL import Image

        try:
            data = self.read(i)
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
                img.load()
                return img.convert(mode)  # a new image, independent of the file closed here
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            raise UnreadableImage(f"cannot read image {self.name(i)}: {e}") from None

    def fingerprint(self) -> str:
        """SHA-256 of the enumeration (relative names and labels, in order): equal for the same items."""
        h = hashlib.sha256()
        for i in range(len(self)):
            h.update(f"{self.relative_name(i)}\t{int(self.labels[i])}\n".encode())
        return h.hexdigest()

    def limit(self, n: int) -> None:
        """Keep the first ``n`` items."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files (a no-op for folders)."""


# ------------------------------------------------------------------------------------------- folders


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_images(folder: Path, base: Path, texts: set[str] | None = None) -> list[str]:
    """Images below ``folder`` (recursively, hidden names skipped) as paths relative to ``base``, sorted by
    their path inside ``folder``; the ``.txt`` files seen on the way are added to ``texts`` (relative to base)."""
    found: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        here = Path(dirpath)
        for f in filenames:
            if _is_image(f):
                p = here / f
                found.append((p.relative_to(folder).as_posix(), p.relative_to(base).as_posix()))
            elif texts is not None and f.endswith(".txt"):
                texts.add((here / f).relative_to(base).as_posix())
    return [rel for _, rel in sorted(found)]


class DatasetSource(Source):
    """The uint8 images of a dataset already in memory (``load_dataset``: Fashion-MNIST, MNIST, digits, ...),
    in the dataset's order with its labels and class names."""

    kind = "dataset"

    def __init__(self, dataset: Any, description: str) -> None:
        if getattr(dataset, "kind", None) != "images" or not hasattr(dataset, "images"):
            raise ImageSourceError(f"{description}: not an image dataset held in memory")
        self.dataset, self.description = dataset, description
        self.labels = dataset.labels.numpy().astype(np.int64)
        self.num_classes = int(dataset.num_classes)
        self.class_names = list(dataset.class_names) if dataset.class_names else None
        if getattr(dataset, "caption_ids", None) is not None:  # e.g. shapes-scenes: captions go with the latents
            self.captions = CaptionList(list(dataset.captions))
            self.caption_codes = dataset.caption_ids.cpu().numpy().astype(np.int64)

    def name(self, i: int) -> str:
        return f"{self.description}[{i}]"

    def relative_name(self, i: int) -> str:
        return str(i)

    def open_image(self, i: int, mode: str = "RGB") -> Image.Image:
        from PIL import Image

        arr = self.dataset.images[i].numpy()  # uint8 (C, H, W)
        img = Image.fromarray(arr[0], mode="L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0))
        return img.convert(mode)

    def limit(self, n: int) -> None:
        self.dataset = self.dataset.subset(slice(0, n))
        self.labels = self.labels[:n]
        if self.caption_codes is not None:
            self.caption_codes = self.caption_codes[:n]


class FolderSource(Source):
    """Images of a class folder (``classes`` given) or a plain folder (one class, label 0)."""

    kind = "folder"

    def __init__(self, root: Path, rel: list[str], labels: np.ndarray, classes: list[str] | None,
                 texts: set[str] | None = None) -> None:
        self.root, self.rel, self.labels = root, rel, labels
        self.class_names = classes
        self.num_classes = len(classes) if classes else 1
        self.description = str(root)
        present = {root / t for t in texts} if texts is not None else None
        self.captions, self.caption_codes = folder_captions([root / r for r in rel], present).finish()

    def name(self, i: int) -> str:
        return str(self.root / self.rel[i])

    def relative_name(self, i: int) -> str:
        return self.rel[i]

    def read(self, i: int) -> Path:
        return self.root / self.rel[i]

    def caption_problem(self, i: int) -> str:
        assert self.caption_codes is not None
        return folder_problem(self.root / self.rel[i], int(self.caption_codes[i]))

    def limit(self, n: int) -> None:
        self.rel, self.labels = self.rel[:n], self.labels[:n]
        if self.caption_codes is not None:
            self.caption_codes = self.caption_codes[:n]


def _no_images(root: Path) -> ImageSourceError:
    return ImageSourceError(
        f"--input {root}: no images found (looked for ROOT/<class>/<images>, ROOT/train/<class>/<images> and "
        f"ROOT/<images>; accepted extensions: {', '.join(IMAGE_EXTENSIONS)}, any case)"
    )


def open_folder(root: Path, unlabelled: bool = False) -> FolderSource:
    """Enumerate an image folder (see the module docstring); a :class:`ImageSourceError` when it has no images
    or holds both images and class subfolders."""
    root = root.resolve()
    if (root / "train").is_dir() and any(p.is_dir() for p in (root / "train").iterdir()):
        root = root / "train"  # the ImageNet layout ROOT/train/<wnid>/
    texts: set[str] = set()
    if unlabelled:
        rel = _walk_images(root, root, texts)
        if not rel:
            raise _no_images(root)
        return FolderSource(root, rel, np.zeros(len(rel), dtype=np.int64), None, texts)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and _is_image(p.name))
    if not classes:
        if not loose:
            raise _no_images(root)
        texts = {p.name for p in root.iterdir() if p.name.endswith(".txt")}
        return FolderSource(root, loose, np.zeros(len(loose), dtype=np.int64), None, texts)
    rel, labels = [], []
    for k, c in enumerate(classes):
        files = _walk_images(root / c, root, texts)
        rel += files
        labels += [k] * len(files)
    if not rel:
        raise _no_images(root)
    if loose:
        shown = ", ".join(classes[:3]) + (", ..." if len(classes) > 3 else "")
        raise ImageSourceError(
            f"--input {root} holds both class subfolders ({shown}) "
            f"and {len(loose)} image(s) directly in it (first: {loose[0]}); move those into a class folder, or "
            "pass --unlabelled to use every image with label 0"
        )
    return FolderSource(root, rel, np.asarray(labels, dtype=np.int64), classes, texts)


# ------------------------------------------------------------------------------------------- tars


class TarSource(Source):
    """Samples of webdataset tars, read by offset."""

    kind = "tar"

    def __init__(self, tars: list[Path], description: str, unlabelled: bool = False) -> None:
        self.tars, self.description = tars, description
        cols: dict[str, list] = {k: [] for k in ("tar", "member", "off", "size", "label")}
        texts = CaptionIndexer()
        for t, path in enumerate(tars):
            self._index(t, path, cols, texts, unlabelled)
        if not cols["member"]:
            raise ImageSourceError(f"--input {description}: no samples with an image member "
                               f"({', '.join(TAR_IMAGE_EXTENSIONS)}) in {len(tars)} tar file(s)")
        labels = cols["label"]
        missing = [i for i, y in enumerate(labels) if y is None]
        if missing and len(missing) < len(labels):
            i = missing[0]
            raise ImageSourceError(f"{tars[cols['tar'][i]]}:{cols['member'][i]} has no label (.cls or .json) but other "
                               "samples have one; label every sample, or pass --unlabelled")
        self.members: list[str] = cols["member"]
        self.tar_of = np.asarray(cols["tar"], dtype=np.int32)
        self.off, self.size = np.asarray(cols["off"], np.int64), np.asarray(cols["size"], np.int64)
        self.captions, self.caption_codes = texts.finish()
        self.labels = np.asarray([0 if y is None else y for y in labels], dtype=np.int64)
        self.num_classes = int(self.labels.max()) + 1
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def _index(self, t: int, path: Path, cols: dict[str, list], texts: CaptionIndexer, unlabelled: bool) -> None:
        groups = scan_tar(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            for key in sorted(groups):
                members = groups[key]
                ext = next((e for e in TAR_IMAGE_EXTENSIONS if e in members), None)
                if ext is None:
                    continue
                label, caption = label_and_caption(fd, f"{path}:{key}", members, unlabelled)
                texts.add(caption)
                for col, v in zip(cols, (t, f"{key}.{ext}", *members[ext], label)):
                    cols[col].append(v)
        finally:
            os.close(fd)

    def name(self, i: int) -> str:
        return f"{self.tars[self.tar_of[i]]}:{self.members[i]}"

    def relative_name(self, i: int) -> str:
        return f"{self.tars[self.tar_of[i]].name}/{self.members[i]}"

    def _pread(self, t: int, size: int, off: int) -> bytes:
        if self._pid != os.getpid():  # a DataLoader worker: open its own files
            self._fds, self._pid = {}, os.getpid()
        if t not in self._fds:
            self._fds[t] = os.open(self.tars[t], os.O_RDONLY)
        data = os.pread(self._fds[t], size, off)
        if len(data) != size:
            raise OSError(f"{self.tars[t]} ends early (truncated after indexing?)")
        return data

    def read(self, i: int) -> bytes:
        return self._pread(int(self.tar_of[i]), int(self.size[i]), int(self.off[i]))

    def caption_problem(self, i: int) -> str:
        assert self.caption_codes is not None
        key = f"{self.tars[self.tar_of[i]]}:{self.members[i].rpartition('.')[0]}"
        if int(self.caption_codes[i]) == EMPTY:
            return f"{key}: its caption (.txt, or 'caption' in .json) is empty"
        return f"{key} has no caption (no .txt member, and no 'caption' field in a .json member)"

    def limit(self, n: int) -> None:
        self.members, self.labels = self.members[:n], self.labels[:n]
        for name in ("tar_of", "off", "size", "caption_codes"):
            setattr(self, name, getattr(self, name)[:n])

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}


# ------------------------------------------------------------------------------------------- any input


def _tar_list(inputs: list[str]) -> tuple[list[Path], str]:
    """The tar files of ``--input`` values (brace patterns, folders of ``*.tar``, files) and a description."""
    tars: list[Path] = []
    for value in inputs:
        p = Path(value)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.name.endswith(".tar"))
            if not found:
                raise ImageSourceError(f"--input {value}: a list of inputs must be tar files or folders of *.tar")
            tars += found
        else:
            tars += [Path(s) for s in expand_braces(value)]
    for t in tars:
        if not t.is_file():
            raise ImageSourceError(f"--input: tar file {t} does not exist")
    tars = [t.resolve() for t in tars]
    if len(set(tars)) != len(tars):
        raise ImageSourceError("--input names a tar file twice; each sample would be encoded twice")
    if len(inputs) == 1:
        p = Path(inputs[0])
        desc = str(p.resolve() / "*.tar") if p.is_dir() else str(p.parent.resolve() / p.name)
    else:
        desc = ", ".join(map(str, tars)) if len(tars) <= 3 else f"{tars[0]} ... {tars[-1]} ({len(tars)} tar files)"
    return tars, desc


def open_source(inputs: list[str], unlabelled: bool = False, max_items: int | None = None,
                num_classes: int | None = None) -> Source:
    """Enumerate ``--input``: one image folder, or webdataset tars (patterns, folders of ``*.tar``, files).

    Raises:
        ImageSourceError: nothing to read, a missing or damaged tar, inconsistent labels, ``num_classes``
            smaller than a label.
    """
    if not inputs:
        raise ImageSourceError("--input: give an image folder or webdataset tar files")
    first = Path(inputs[0])
    is_folder = (len(inputs) == 1 and first.is_dir()
                 and not any(q.is_file() and q.name.endswith(".tar") for q in first.iterdir()))
    if is_folder:
        src: Source = open_folder(first, unlabelled)
    elif len(inputs) == 1 and not first.exists() and "{" not in inputs[0] and not inputs[0].endswith(".tar"):
        raise ImageSourceError(f"--input {inputs[0]} does not exist (give an image folder, tar files or a brace "
                           "pattern like 'data/shard-{000..009}.tar')")
    else:
        tars, desc = _tar_list(inputs)
        src = TarSource(tars, desc, unlabelled)
    return restrict(src, max_items, num_classes)


def restrict(src: Source, max_items: int | None = None, num_classes: int | None = None) -> Source:
    """Keep the first ``max_items`` items; record ``num_classes`` classes (it must exceed every label)."""
    if max_items is not None:
        src.limit(max_items)
    if num_classes is not None:
        top = int(src.labels.max()) if len(src) else 0
        if num_classes <= top:
            raise ImageSourceError(f"--num-classes {num_classes} is too small: the input has label {top}")
        src.num_classes = num_classes
        if src.class_names is not None and len(src.class_names) != num_classes:
            raise ImageSourceError(f"--num-classes {num_classes}: the folder has {len(src.class_names)} class "
                               "subfolders; leave --num-classes out")
    return src
