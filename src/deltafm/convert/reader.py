"""Read a public ``torch.save`` checkpoint without running code from it.

``torch.load(weights_only=True)`` (torch >= 2.6) unpickles only tensors, containers and plain values;
a pickle that names anything else (a class, a function: a code payload) is refused *before* that object is
built, so nothing from the file runs. The one non-tensor type let through is ``argparse.Namespace``, which
the reference trainers store under ``args`` (building one only sets attributes).

Top-level layouts recognised (facts from the public trainers):

* ``{"model": sd, "ema": sd, "opt": ..., "args": Namespace, "steps": int}``: REPA / ΔFM-reference
  ``train.py`` and SiT ``train.py`` (SiT: no ``steps``);
* a bare state dict (the released ``SiT-XL-2-256x256.pt`` and REPA's ``last.pt`` hold the EMA weights only).
"""

from __future__ import annotations

import argparse
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deltafm.errors import UserError

__all__ = ["ConvertError", "MIN_TORCH", "read_torch_file", "pick_weights", "args_dict"]

#: the oldest torch whose weights-only unpickler (and ``safe_globals``) this reader relies on
MIN_TORCH = (2, 6)


class ConvertError(UserError, ValueError):
    """A source checkpoint cannot be converted (unsafe, unreadable, or of an unknown layout)."""


def _torch_version() -> tuple[int, int]:
    parts = torch.__version__.split("+")[0].split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def read_torch_file(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU; a file that needs code is a :class:`ConvertError`."""
    path = Path(path)
    if _torch_version() < MIN_TORCH:
        raise ConvertError(f"reading a torch.save file safely needs torch >= {'.'.join(map(str, MIN_TORCH))} "
                           f"(weights-only unpickling); this is torch {torch.__version__}")
    if not path.is_file():
        raise ConvertError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_can_mmap(path))
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        why = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[-1] if first else "")
        raise ConvertError(f"refusing {path}: it needs code to load (not only tensors), and it was not run. "
                           f"torch's weights-only reader says: {why}") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise ConvertError(f"cannot read {path} as a torch.save checkpoint: {str(e).strip().splitlines()[0]}") from None


def _can_mmap(path: Path) -> bool:
    """Memory-map zip-format files (large checkpoints stay on disk); the legacy format cannot be."""
    return zipfile.is_zipfile(path)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, Tensor)
                                                       for k, v in obj.items())


def pick_weights(obj: Any, which: str = "ema") -> tuple[dict[str, Tensor], str]:
    """The state dict to convert and where it came from (``ema``, ``model`` or ``state_dict``)."""
    if which not in ("ema", "model"):
        raise ConvertError(f"--weights must be 'ema' or 'model', got {which!r}")
    if _is_state_dict(obj):
        return obj, "state_dict"
    if not isinstance(obj, dict):
        raise ConvertError(f"expected a dict of weights, found a {type(obj).__name__}")
    if which in obj and _is_state_dict(obj[which]):
        return obj[which], which
    other = "model" if which == "ema" else "ema"
    present = sorted(str(k) for k in obj)
    hint = f"; it has {other!r}: pass --weights {other}" if other in obj else ""
    raise ConvertError(f"no {which!r} state dict in the checkpoint (top-level keys: {present}){hint}")


def args_dict(obj: Any) -> dict[str, Any]:
    """The trainer's arguments stored with the weights (``args``), as a plain dict (empty when absent)."""
    args = obj.get("args") if isinstance(obj, dict) else None
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, dict):
        return {}
    return {str(k): v for k, v in args.items() if isinstance(v, str | int | float | bool | type(None) | list)}
