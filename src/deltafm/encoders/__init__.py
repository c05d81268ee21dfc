"""Frozen image encoders for REPA targets: images in [−1, 1] → patch tokens on a requested grid.

    from deltafm.encoders import load_encoder
    enc = load_encoder("dinov2-base")                 # a local save_pretrained folder (nothing is downloaded)
    tokens = enc(images, grid=(16, 16))               # (B, 256, 768) float32; DINOv2-B/14 runs at 224 px

:class:`ImageEncoder` (:mod:`deltafm.encoders.base`) does REPA's preprocessing (to [0, 1], gray → RGB,
per-channel normalisation, bicubic resize to grid × patch) and returns float32 tokens without gradients;
:class:`Dinov2Encoder` (:mod:`deltafm.encoders.hf`) is transformers' DINOv2 (with or without registers);
:class:`ModuleEncoder` (:mod:`deltafm.encoders.module`) wraps any torch module. transformers is imported
only when a folder is loaded. See docs/ENCODERS.md.

Text encoders (:mod:`deltafm.encoders.text`, loaded by :mod:`deltafm.encoders.text_load`):
``load_text_encoder(folder or "minilm")`` gives a frozen :class:`TextEncoder` whose ``encode(captions)``
returns a :class:`~deltafm.conditioning.TextCond` (CLIP text, T5 encoders and BERT-like sentence encoders
from local folders).
"""

from .base import IMAGENET_MEAN, IMAGENET_STD, EncoderError, ImageEncoder, encoder_name, preprocess
from .hf import Dinov2Encoder, load_dinov2
from .module import ModuleEncoder
from .registry import load_encoder
from .text import TextEncoder, TextEncoderError
from .text_load import load_text_encoder, minilm_dir

__all__ = ["EncoderError", "ImageEncoder", "Dinov2Encoder", "ModuleEncoder", "load_encoder", "load_dinov2",
           "preprocess", "encoder_name", "IMAGENET_MEAN", "IMAGENET_STD", "TextEncoder", "TextEncoderError",
           "load_text_encoder", "minilm_dir"]
