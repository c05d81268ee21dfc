"""Checks shared by the trainers' settings (``train-autoencoder``, ``train-encoder``): numeric ranges, the
device name, and resolving it. Each trainer passes its own :class:`~deltafm.errors.UserError` subclass, so
the message is one ``error:`` line naming the option (``max_items`` → ``--max-items``)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from deltafm.errors import UserError

__all__ = ["check_ranges", "check_device_name", "resolve_device"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_ranges(error: type[UserError], *, positive: Mapping[str, float] = {},  # noqa: B006 - read only
                 optional_positive: Mapping[str, float | None] = {},  # noqa: B006
                 nonnegative: Mapping[str, float] = {}) -> None:  # noqa: B006
    """``positive``: ints >= 1; ``optional_positive``: None or >= 1; ``nonnegative``: finite and >= 0."""
    for name, v in positive.items():
        if int(v) < 1:
            raise error(f"{_flag(name)} must be >= 1, got {v}")
    for name, v in optional_positive.items():
        if v is not None and v < 1:
            raise error(f"{_flag(name)} must be >= 1, got {v}")
    for name, v in nonnegative.items():
        if not (math.isfinite(float(v)) and float(v) >= 0):
            raise error(f"{_flag(name)} must be finite and >= 0, got {v}")


def check_device_name(device: str, error: type[UserError]) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise error(f"--device must be auto, cpu or cuda[:N], got {device!r}")


def resolve_device(name: str, error: type[UserError]) -> torch.device:
    """``auto``: CUDA when available, else the CPU; ``cuda`` without a GPU is ``error``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise error(f"--device {name}: no CUDA device is available (use --device cpu)")
    return torch.device(name)
