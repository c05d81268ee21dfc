"""Webdataset tar samples: the member index of a plain tar, and a sample's label and caption; the errors of
image inputs (:mod:`deltafm.data.image_sources` uses both).

Members are grouped by key (the member name up to the first dot of its base name). A sample's label is the
integer text of its ``cls`` member, else the field ``label`` of its ``json`` member (a ``json`` without
``label`` gives none: img2dataset's metadata); its caption is its ``txt`` member, else the string field
``caption`` of its ``json`` member. Only these small members are read, never the image.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Any

from deltafm.data.datasets import DataError

__all__ = ["ImageSourceError", "UnreadableImage", "label_and_caption", "member_text", "scan_tar", "split_key"]


class ImageSourceError(DataError):
    """An image input cannot be read as asked (no images, a missing or damaged tar, inconsistent labels);
    the message names the file and the fix."""


class UnreadableImage(ImageSourceError):
    """An image that cannot be decoded (damaged, truncated, not an image); the message names it."""


def split_key(member: str) -> tuple[str, str] | None:
    """(key, extension) of a webdataset member name: the key ends at the first dot of the base name."""
    d, _, base = member.rpartition("/")
    if base.startswith(".") or "." not in base:
        return None
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def scan_tar(path: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """key -> {extension: (data offset, size)} of the regular members of a plain tar."""
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00":
            raise ImageSourceError(f"{path} is a compressed tar; prepare-latents reads items at random and needs "
                               "plain tars: decompress it (e.g. gunzip) first")
        with tarfile.open(path, mode="r:") as tf:
            while (m := tf.next()) is not None:
                tf.members.clear()  # the index below is all that is kept
                ke = split_key(m.name) if m.isreg() else None
                if ke is not None:
                    groups.setdefault(ke[0], {})[ke[1]] = (m.offset_data, m.size)
    except tarfile.TarError as e:
        raise ImageSourceError(f"{path}: not a readable (uncompressed) tar file ({e})") from None
    except (IsADirectoryError, FileNotFoundError, PermissionError) as e:
        raise ImageSourceError(f"--input {path}: cannot open ({e.strerror})") from None
    return groups


def member_text(fd: int, members: dict[str, tuple[int, int]], ext: str) -> str | None:
    """The text of member ``ext`` of a sample (UTF-8, undecodable bytes replaced), or None without one."""
    if ext not in members:
        return None
    off, size = members[ext]
    return os.pread(fd, size, off).decode("utf-8", errors="replace")


def label_and_caption(fd: int, where: str, members: dict[str, tuple[int, int]],
                       unlabelled: bool) -> tuple[int | None, str | None]:
    """A sample's label (integer text of ``cls``, else field ``label`` of ``json``; None without either, or with
    ``unlabelled``) and caption (``txt``, else the string field ``caption`` of ``json``; None without)."""
    caption = member_text(fd, members, "txt")
    cls = None if unlabelled else member_text(fd, members, "cls")
    meta: Any = None
    if "json" in members and ((not unlabelled and cls is None) or caption is None):
        text = (member_text(fd, members, "json") or "").strip()
        try:
            meta = json.loads(text)
        except ValueError:
            meta = text  # not JSON: holds no caption; a label asked of it is an error below
    if caption is None and isinstance(meta, dict) and isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    if unlabelled or (cls is None and (meta is None or (isinstance(meta, dict) and "label" not in meta))):
        return None, caption  # no cls, and no json or one without a label (img2dataset's metadata)
    try:
        value = int(cls) if cls is not None else meta["label"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        ext, what = ("cls", "an integer >= 0") if cls is not None else (
            "json", "a JSON object with an integer field 'label' >= 0")
        shown = (cls or "").strip() if cls is not None else meta if isinstance(meta, str) else json.dumps(meta)
        raise ImageSourceError(f"{where}.{ext}: expected {what}, got {shown[:60]!r}") from None
    return value, caption
