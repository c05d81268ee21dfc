"""What a model reference that is not a local path looks like: a hub id (nothing is ever downloaded)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["local_folder", "looks_like_hub_id"]


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
