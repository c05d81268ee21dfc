"""A disk cache of text-feature tables, so a run (or a study's next training start) does not encode the same
captions again.

The key is the SHA-256 of the encoder's identity (class + hash of config, tokenizer and weights), the
padding length, the truncation flag and every caption in order: the same key means the same encoder on
the same captions, so the stored table is exactly what :meth:`~deltafm.train.conditions.Conditions.encode`
would return (tokens float16, as the run keeps them). Files live in ``$DELTAFM_CACHE_DIR/text-tables``
(default ``~/.cache/deltafm``; ``DELTAFM_CACHE_DIR=off`` turns the cache off), one safetensors file per key,
written atomically; a damaged or foreign file is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from deltafm.atomic import atomic_write
from deltafm.conditioning import TextCond

__all__ = ["cache_dir", "load_table", "save_table", "table_key"]

_FORMAT = "deltafm.text-table.v1"


def cache_dir() -> Path | None:
    """The folder of cached tables, or None when ``DELTAFM_CACHE_DIR=off``."""
    root = os.environ.get("DELTAFM_CACHE_DIR")
    if root is not None and root.strip().lower() in ("off", "0", "none", ""):
        return None
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deltafm"
    return base / "text-tables"


def table_key(identity: str, max_tokens: int, truncate: bool, captions: Sequence[str]) -> str:
    """SHA-256 of what determines a table."""
    h = hashlib.sha256()
    h.update(f"{_FORMAT}\0{identity}\0{int(max_tokens)}\0{int(bool(truncate))}\0{len(captions)}\0".encode())
    for c in captions:
        h.update(c.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def load_table(key: str) -> TextCond | None:
    """The cached table of ``key`` (tokens float16), or None (no cache, no file, or an unreadable one)."""
    folder = cache_dir()
    path = folder / f"{key}.safetensors" if folder is not None else None
    if path is None or not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            t = {k: f.get_tensor(k) for k in ("tokens", "mask", "pooled")}
    except (SafetensorError, OSError, KeyError):
        return None
    return TextCond(t["tokens"], t["mask"], t["pooled"], torch.zeros(t["tokens"].shape[0], dtype=torch.bool))


def save_table(key: str, table: TextCond) -> Path | None:
    """Store ``table`` (tokens as float16) under ``key``; None when the cache is off or cannot be written."""
    folder = cache_dir()
    if folder is None:
        return None
    from safetensors.torch import save_file

    tensors = {"tokens": table.tokens.half().contiguous().cpu(), "mask": table.mask.contiguous().cpu(),
               "pooled": table.pooled.float().contiguous().cpu()}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return atomic_write(folder / f"{key}.safetensors",
                            lambda tmp: save_file(tensors, str(tmp), metadata={"key": key, "format": _FORMAT}),
                            tmp=folder / f".tmp-{os.getpid()}-{key}.safetensors")
    except OSError:
        return None
