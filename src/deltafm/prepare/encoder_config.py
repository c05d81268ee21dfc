"""Settings of ``deltafm train-encoder``: one dataclass, its checks, and the transformers config it makes.

The model is transformers' own ``Dinov2Model`` (the class of facebook/dinov2-*, so the result loads with
:func:`deltafm.encoders.load_encoder` like a real DINOv2): patch embedding of ``patch_size`` p, a CLS
token, learned position embeddings for a ``grid`` × ``grid`` token grid (input side S = grid · p),
``depth`` pre-norm transformer blocks of width ``hidden`` with ``heads`` attention heads, an MLP of width
``mlp_ratio`` · ``hidden`` and LayerScale, and a final LayerNorm.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from deltafm.errors import UserError

from .settings_checks import check_device_name, check_ranges

__all__ = ["TrainEncoderError", "EncoderSettings", "check_settings", "dinov2_config"]


class TrainEncoderError(UserError, ValueError):
    """``deltafm train-encoder`` cannot run as asked (an option out of range, a dataset without classes, an
    output folder that is not empty); the message names the fix."""


@dataclass
class EncoderSettings:
    """Everything a run of ``deltafm train-encoder`` depends on (the CLI's options, resolved).

    Data: ``dataset``/``root``/``max_items`` as in :func:`deltafm.data.load_dataset`; ``heldout``: at most
    this many items of the test split (or, for a folder without one, carved from the training images) to
    measure the accuracy. Augmentation: every training image is shifted by (dy, dx) drawn uniformly from
    {−``shift``, …, ``shift``}² (zero-padded, black), at the dataset's resolution, then mirrored left–right
    with probability ½ when ``flip`` (only for data whose classes survive mirroring: Fashion-MNIST, not
    digits). Both are off by default: in the few epochs of the default run they cost held-out accuracy
    (docs/ENCODERS.md).

    Model: a ``Dinov2Model`` at ``grid`` × ``grid`` tokens of ``patch_size`` px (input side grid · patch),
    ``hidden``, ``depth``, ``heads``, ``mlp_ratio``; the classifier is Linear([CLS ; mean of patches]).

    Optimisation: AdamW(``lr``, betas (0.9, 0.999), ``weight_decay`` on matrices only), cross-entropy with
    ``label_smoothing``, ``epochs`` passes of ``batch_size`` (the last incomplete batch of an epoch is
    dropped), linear warm-up over ``warmup`` steps then cosine decay to 0, gradient norm clipped to
    ``grad_clip`` (0: off).
    """

    dataset: str = "fashion-mnist"
    root: str | None = None
    max_items: int | None = None
    heldout: int = 10_000
    grid: int = 7
    patch_size: int = 4
    hidden: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    shift: int = 0
    flip: bool = False
    epochs: int = 7
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def image_size(self) -> int:
        """The side the encoder sees: grid · patch_size."""
        return self.grid * self.patch_size


def _bad(msg: str) -> TrainEncoderError:
    return TrainEncoderError(msg)


def check_settings(s: EncoderSettings) -> None:
    """Refuse settings that cannot make a model (before any data is read)."""
    check_ranges(TrainEncoderError,
                 positive=dict(heldout=s.heldout, grid=s.grid, patch_size=s.patch_size, hidden=s.hidden,
                               depth=s.depth, heads=s.heads, mlp_ratio=s.mlp_ratio, epochs=s.epochs,
                               batch_size=s.batch_size),
                 optional_positive=dict(max_items=s.max_items, threads=s.threads),
                 nonnegative=dict(shift=s.shift, warmup=s.warmup, weight_decay=s.weight_decay,
                                  grad_clip=s.grad_clip, seed=s.seed))
    if not (math.isfinite(s.lr) and s.lr > 0):
        raise _bad(f"--lr must be finite and > 0, got {s.lr}")
    if not 0 <= s.label_smoothing < 1:
        raise _bad(f"--label-smoothing must be in [0, 1), got {s.label_smoothing}")
    if s.hidden % s.heads:
        raise _bad(f"--hidden {s.hidden} must be a multiple of --heads {s.heads} (the width of each head)")
    check_device_name(s.device, TrainEncoderError)


def dinov2_config(s: EncoderSettings) -> dict[str, Any]:
    """The ``transformers.Dinov2Config`` arguments of these settings (RGB input: gray images are repeated,
    as at use time)."""
    return dict(hidden_size=s.hidden, num_hidden_layers=s.depth, num_attention_heads=s.heads,
                mlp_ratio=s.mlp_ratio, image_size=s.image_size, patch_size=s.patch_size, num_channels=3,
                hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True, layerscale_value=1.0, drop_path_rate=0.0,
                use_swiglu_ffn=False)
