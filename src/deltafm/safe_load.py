"""Reading weight files without running code from them: one reader for every ``torch.save`` input.

``torch.load(weights_only=True)`` rebuilds only tensors, containers and plain values; a pickle that
names anything else (a class, a function: a code payload) is refused *before* that object is built.
Torch releases before 2.6 have a known bypass of that loader (CVE-2025-32434), so it is used only on
torch >= 2.6. The file's kind is read from its first bytes, never from its name, so a plain pickle
renamed ``.pt`` never reaches an unpickler at all.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["SAFE_TORCH", "torch_version", "sniff_weights_format", "load_weights_only"]

#: The first torch release whose ``weights_only=True`` loader is not bypassable (CVE-2025-32434).
SAFE_TORCH = (2, 6)
#: First bytes of a legacy (non-zip) ``torch.save`` file: a protocol-2 pickle of torch's magic number.
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch."""
    parts = torch.__version__.split("+")[0].split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def sniff_weights_format(path: str | os.PathLike) -> str:
    """``"safetensors"``, ``"torch"`` (a ``torch.save`` file: zip archive or the legacy format) or
    ``"unknown"`` (a plain pickle, text, anything else), from the file's first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(16)
        size = os.fstat(fh.fileno()).st_size
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head.startswith(_TORCH_LEGACY_MAGIC):
        return "torch"
    return "unknown"


def _reason(err: BaseException) -> str:
    """torch's one-line reason, without its advice to retry with ``weights_only=False``."""
    detail = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()
    reason = next((line.strip() for line in detail if line.strip()), "").split(". ")[0][:200]
    return type(err).__name__ if not reason or "weights_only" in reason else reason


def load_weights_only(path: str | os.PathLike, error: type[Exception], allow: Sequence[type] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU (zip files memory-mapped), with ``allow`` as
    extra safe types. Raises ``error`` (one line) on torch < 2.6, for a file that is not a ``torch.save``
    file, for one that needs code to load (nothing of it is run), and for one that cannot be read."""
    path = Path(path)
    if torch_version() < SAFE_TORCH:
        raise error(f"{path}: reading a torch.save file safely needs torch >= {'.'.join(map(str, SAFE_TORCH))} "
                    f"(its weights_only loader); this is torch {torch.__version__}")
    if sniff_weights_format(path) != "torch":
        raise error(f"refusing {path}: not a torch.save file (a plain pickle, text or other data); nothing in "
                    "it was run")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(allow)):
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the error below says it all
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise error(f"refusing {path}: not a weights-only state dict (it needs code to load, and none of it "
                    f"was run); torch.load(weights_only=True) says: {_reason(err)}") from None
    except Exception as err:  # noqa: BLE001 - a damaged or truncated file fails in many ways inside torch
        raise error(f"cannot read {path} as a torch.save file: {_reason(err)}") from None
