"""``load_encoder(spec)``: the one way to get a REPA encoder by name.

A spec is a local folder; its ``config.json`` says which loader reads it (today: transformers DINOv2,
``model_type`` ``dinov2`` / ``dinov2_with_registers``). Hub ids are not downloaded: save the model
into a folder on a machine with internet and pass that folder (docs/ENCODERS.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .base import EncoderError, ImageEncoder
from .hf import DINOV2_TYPES, check_dinov2_folder, load_dinov2

__all__ = ["load_encoder", "looks_like_hub_id"]


def looks_like_hub_id(spec: str) -> bool:
    """``org/name``: what the hub would be asked for, not a local path."""
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def load_encoder(spec: str | os.PathLike, *, name: str | None = None,
                 device: torch.device | str = "cpu") -> ImageEncoder:
    """The frozen encoder in the folder ``spec`` (float32, on ``device``).

    Args:
        spec: a folder written by ``save_pretrained`` of a transformers DINOv2 model (``config.json``,
            weights, optionally ``preprocessor_config.json``), e.g. one from ``deltafm train-encoder``.
        name: the encoder's short name (default: the folder's name, sanitised to [A-Za-z0-9._-]).
        device: where it runs.

    Raises:
        EncoderError: no such folder (hub ids are not downloaded), not an encoder folder, another model
            type, missing weights, or transformers not installed.
    """
    text = os.fspath(spec).strip() if spec is not None else ""
    if not text:
        raise EncoderError("empty encoder spec; pass the folder of a saved DINOv2 model")
    path = Path(text).expanduser()
    if not path.exists():
        if looks_like_hub_id(text):
            raise EncoderError(
                f"encoder {text!r} is not a local folder and hub ids are not downloaded; on a machine with internet "
                f"run python -c \"from transformers import AutoModel; AutoModel.from_pretrained('{text}')"
                f".save_pretrained('{text.split('/')[1]}')\" and pass that folder")
        raise EncoderError(f"encoder {text!r}: no such folder (pass a folder saved with save_pretrained)")
    if not path.is_dir():
        raise EncoderError(f"encoder {text!r} is a file, not a folder (pass the folder that holds config.json)")
    cfg = check_dinov2_folder(path)
    if cfg["model_type"] in DINOV2_TYPES:
        return load_dinov2(path, name=name, device=device)
    raise AssertionError(f"unhandled model_type {cfg['model_type']!r}")  # pragma: no cover
