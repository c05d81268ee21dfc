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
from pathlib import Path
from typing import Any

from torch import Tensor

from deltafm.errors import UserError
from deltafm.safe_load import load_weights_only

__all__ = ["ConvertError", "read_torch_file", "pick_weights", "args_dict"]

class ConvertError(UserError, ValueError):
    """A source checkpoint cannot be converted (unsafe, unreadable, or of an unknown layout)."""


def read_torch_file(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU (:func:`deltafm.safe_load.load_weights_only`);
    a missing file, a file that is not a ``torch.save`` file or one that needs code is a :class:`ConvertError`."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"checkpoint file not found: {path}")
    return load_weights_only(path, ConvertError, allow=[argparse.Namespace])


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
