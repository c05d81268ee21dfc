"""``load_encoder(spec)``: the one way to get a REPA encoder by name.

A spec is a local folder; its ``config.json`` says which loader reads it (today: transformers DINOv2,
``model_type`` ``dinov2`` / ``dinov2_with_registers``). Hub ids are not downloaded: save the model
into a folder on a machine with internet and pass that folder (docs/ENCODERS.md).

A spec ``python:MODULE:FUNCTION`` calls ``FUNCTION()`` of the importable module ``MODULE`` (for example
``python:mylab.encoders:mocov3``), which must return an :class:`ImageEncoder` (typically a
:class:`~deltafm.encoders.module.ModuleEncoder` around the user's network): the hook for encoders that are
not DINOv2 folders, usable from a training config (``repa.encoders``) and ``prepare-latents --encoder``.
"""

from __future__ import annotations

import os

import torch

from deltafm.hub import local_folder, looks_like_hub_id

from .base import EncoderError, ImageEncoder, encoder_name
from .hf import DINOV2_TYPES, check_dinov2_folder, load_dinov2

__all__ = ["load_encoder", "looks_like_hub_id"]


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
    if text.startswith("python:"):
        return _from_python(text, name, device)
    path = local_folder(text, "encoder", lambda t: (
        f"run python -c \"from transformers import AutoModel; AutoModel.from_pretrained('{t}')"
        f".save_pretrained('{t.split('/')[1]}')\" and pass that folder"), EncoderError)
    cfg = check_dinov2_folder(path)
    if cfg["model_type"] in DINOV2_TYPES:
        return load_dinov2(path, name=name, device=device)
    raise AssertionError(f"unhandled model_type {cfg['model_type']!r}")  # pragma: no cover


def _from_python(spec: str, name: str | None, device: torch.device | str) -> ImageEncoder:
    """``python:MODULE:FUNCTION`` → ``MODULE.FUNCTION()``, checked to be an :class:`ImageEncoder`."""
    import importlib

    parts = spec.split(":")
    if len(parts) != 3 or not all(parts[1:]):
        raise EncoderError(f"encoder {spec!r}: a python spec is python:MODULE:FUNCTION (e.g. python:mylab.enc:make)")
    try:
        factory = getattr(importlib.import_module(parts[1]), parts[2])
    except (ImportError, AttributeError) as e:
        raise EncoderError(f"encoder {spec!r}: cannot import {parts[1]}.{parts[2]} ({e})") from None
    enc = factory()
    if not isinstance(enc, ImageEncoder):
        raise EncoderError(f"encoder {spec!r}: {parts[1]}.{parts[2]}() returned a {type(enc).__name__}, not an "
                           "ImageEncoder (wrap a network in deltafm.encoders.ModuleEncoder)")
    if name is not None:
        enc.name = encoder_name(name)
    return enc.to(device)
