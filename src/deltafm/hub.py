"""Model folders written by ``save_pretrained`` (nothing is ever downloaded): what a hub id looks like, the
checks every loader of such a folder makes (it exists, ``config.json`` reads, weights are there), and the quiet
``from_pretrained`` they share. transformers is imported only inside :func:`quiet_hf_loading`."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["WEIGHT_FILES", "first_line", "local_folder", "looks_like_hub_id", "quiet_hf_loading", "read_config",
           "read_json", "require_weights"]

#: the files save_pretrained writes the weights to (one of them must exist)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def looks_like_hub_id(spec: str) -> bool:
    """``org/name`` (optionally ``org/name:subfolder``): what the hub would be asked for, not a local path."""
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def local_folder(spec: str | os.PathLike, what: str, save_hint: Callable[[str], str],
                 error: Callable[[str], Exception]) -> Path:
    """The existing folder ``spec`` (``~`` expanded), or ``error(message)`` raised for an empty spec, a hub id
    (the message ends with ``save_hint(id)``: how to save it locally on a machine with internet), a missing
    folder or a file. ``what`` names the thing in the messages (e.g. "encoder")."""
    text = os.fspath(spec).strip() if spec is not None else ""
    if not text:
        raise error(f"empty {what} spec; pass a local folder")
    path = Path(text).expanduser()
    if not path.exists():
        if looks_like_hub_id(text):
            raise error(f"{what} {text!r} is not a local folder and hub ids are not downloaded; on a machine with "
                        f"internet {save_hint(text)}")
        raise error(f"{what} {text!r}: no such folder (pass a folder saved with save_pretrained)")
    if not path.is_dir():
        raise error(f"{what} {text!r} is a file, not a folder (pass the folder that holds config.json)")
    return path


def read_json(path: Path, error: Callable[[str], Exception]) -> Any:
    """The JSON in ``path``, or ``error("PATH: not readable JSON (...)")`` raised."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise error(f"{path}: not readable JSON ({e})") from None


def read_config(folder: Path, error: Callable[[str], Exception], missing: str) -> Any:
    """``folder/config.json`` read (:func:`read_json`); ``error(missing)`` raised when there is no such file."""
    path = folder / "config.json"
    if not path.is_file():
        raise error(missing)
    return read_json(path, error)


def require_weights(folder: Path, error: Callable[[str], Exception], files: tuple[str, ...] = WEIGHT_FILES) -> None:
    """``error`` raised unless ``folder`` holds one of ``files`` (default: transformers' :data:`WEIGHT_FILES`)."""
    if not any((folder / w).is_file() for w in files):
        raise error(f"{folder}: config.json but no weights ({' or '.join(files)})")


def first_line(e: Exception) -> str:
    """``TYPE: first line of the message`` of an exception (for one-line errors about damaged files)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


@contextlib.contextmanager
def quiet_hf_loading() -> Iterator[None]:
    """transformers' progress bars off while ``from_pretrained`` runs (restored after)."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar:
            hf_logging.enable_progress_bar()
