"""Inception-v3 in the FID convention, in plain torch, loading weights from a local file only.

This is the network of the TensorFlow FID code (the 2015-12-05 Inception graph) as ported to PyTorch
by pytorch-fid (weights file ``pt_inception-2015-12-05-6726825d.pth``): the standard Inception-v3
layout with 1008 output classes, no auxiliary head, and three differences from torchvision's model:

* the average-pool branches of the A, C and first E blocks (``Mixed_5b–d``, ``Mixed_6b–e``,
  ``Mixed_7b``) average over valid pixels only (``count_include_pad=False``, as TensorFlow does);
* the pool branch of the last E block (``Mixed_7c``) uses a 3x3 *max* pool (stride 1, padding 1);
* BatchNorm eps is 1e-3, convolutions have no bias.

Outputs: ``features(x)`` is the 2048-d global average pool after ``Mixed_7c`` ("pool3", the FID
features); ``logits(x)`` the 1008-way ``fc`` on top of it; ``spatial_features(x)`` the 2023-d sFID
features; ``outputs(x)`` all three in one pass, as :func:`deltafm.eval.features.extract` uses them.

**sFID features.** The ADM evaluator (openai/guided-diffusion ``evaluations/evaluator.py``) reads the
tensor ``mixed_6/conv:0`` of the 2015 TensorFlow graph and keeps its first 7 channels, flattened from
TensorFlow's NHWC layout: 7 x 17 x 17 = 2023 values per image. In that graph the eleven Inception
blocks are ``mixed``, ``mixed_1``, ..., ``mixed_10`` (torchvision: ``Mixed_5b``, ``Mixed_5c``,
``Mixed_5d``, ``Mixed_6a``, ``Mixed_6b``, ``Mixed_6c``, ``Mixed_6d``, ...), so ``mixed_6`` is
``Mixed_6d``; its ``conv`` node is the block's first tower, the 1x1 convolution with BatchNorm and ReLU
(torchvision's ``branch1x1``, 192 channels at 17x17). :meth:`FIDInceptionV3.spatial_features` returns
``Mixed_6d.branch1x1`` output channels 0..6, permuted to (H, W, C) before flattening, so the vector is in
the order of ADM's ``mu_s`` / ``sigma_s`` and those statistics can be used as they are.

**Inception Score logits.** The ADM evaluator (like the original improved-gan Inception Score code)
computes the class probabilities as softmax(pool3 · W), the weights of the graph's ``softmax/logits``
layer *without its bias*; ``outputs(x)["logits"]`` follows that (``logits(x, bias=False)``), while
``logits(x)`` is the full ``fc`` layer.

Input handling: x in [−1, 1], (N, C, H, W) with C = 1 (repeated to RGB) or 3; any size is resized to
299x299 with bilinear interpolation (``align_corners=False``). pytorch-fid resizes in [0, 1] and then
maps to [−1, 1]; bilinear weights sum to 1, so resizing after that affine map gives the same result.

Parameter names follow torchvision's ``Inception3`` (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.
running_mean``, ..., ``fc.weight``), which is the layout of the pytorch-fid weights file, so that file
loads directly. Nothing is downloaded: :func:`load_inception` takes a path.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltafm.eval.metrics import EvalInputError, EvalKeyError
from deltafm.safe_load import load_weights_only, sniff_weights_format

__all__ = [
    "SPATIAL_FEATURE_DIM",
    "FIDInceptionV3",
    "convert_inception",
    "load_inception",
    "load_inception_state_dict",
    "sniff_weights_format",
]

FID_INPUT_SIZE = 299
FID_NUM_CLASSES = 1008
FID_FEATURE_DIM = 2048
#: Channels of ``mixed_6/conv`` (``Mixed_6d.branch1x1``) kept for sFID, and the resulting dimension.
SPATIAL_CHANNELS = 7
SPATIAL_FEATURE_DIM = SPATIAL_CHANNELS * 17 * 17


class _ConvBN(nn.Module):
    """conv (no bias) → BatchNorm (eps 1e-3) → ReLU; attribute names ``conv`` and ``bn``."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_valid(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average over valid (non-padded) pixels, TensorFlow style."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):
    """35x35 block: 1x1 | 1x1→5x5 | 1x1→3x3→3x3 | avgpool→1x1; out 224 + pool_features channels."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 64, 1)
        self.branch5x5_1 = _ConvBN(c_in, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_valid(x)),
        ], dim=1)


class _BlockB(nn.Module):
    """Grid reduction 35→17: 3x3/2 | 1x1→3x3→3x3/2 | maxpool/2; out 384 + 96 + c_in channels."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = _ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], dim=1)


class _BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1); out 4 x 192 = 768 channels."""

    def __init__(self, c_in: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 192, 1)
        self.branch7x7_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_valid(x))], dim=1)


class _BlockD(nn.Module):
    """Grid reduction 17→8: 1x1→3x3/2 | 1x1→1x7→7x1→3x3/2 | maxpool/2; out 320 + 192 + c_in."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = _ConvBN(c_in, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], dim=1)


class _BlockE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs; out 320 + 768 + 768 + 192 = 2048 channels.

    ``pool="avg"`` (valid-pixel average, Mixed_7b) or ``"max"`` (Mixed_7c in the FID network).
    """

    def __init__(self, c_in: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = _ConvBN(c_in, 320, 1)
        self.branch3x3_1 = _ConvBN(c_in, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool_valid(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(pooled),
        ], dim=1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the FID convention: ``features`` (N, 2048) pool3, ``logits`` (N, 1008).

    Randomly initialised by PyTorch's defaults; load real weights with :func:`load_inception`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _BlockA(192, 32)
        self.Mixed_5c = _BlockA(256, 64)
        self.Mixed_5d = _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, 128)
        self.Mixed_6c = _BlockC(768, 160)
        self.Mixed_6d = _BlockC(768, 160)
        self.Mixed_6e = _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, pool="avg")
        self.Mixed_7c = _BlockE(2048, pool="max")
        self.fc = nn.Linear(FID_FEATURE_DIM, FID_NUM_CLASSES)
        #: "inception:<sha256 of the weights file>" after :func:`load_inception`.
        self.extractor_id = "inception:random-init"

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """(N, 1|3, H, W) in [−1, 1] → (N, 3, 299, 299): gray repeated to RGB, bilinear resize."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise EvalInputError(f"Inception takes 1- or 3-channel images: expected (N, 1 or 3, H, W) in [-1, 1], "
                                 f"got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (FID_INPUT_SIZE, FID_INPUT_SIZE):
            x = F.interpolate(x, size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False)
        return x

    def _trunk(self, x: torch.Tensor, spatial: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prepared input → (pool3 (N, 2048), sFID features (N, 2023) when ``spatial``, else None)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))))
        s = None
        if spatial:  # mixed_6/conv of the TF graph: Mixed_6d's 1x1 tower (conv, BN, ReLU), first 7 channels
            s = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3)), s

    def _head(self, f: torch.Tensor, bias: bool) -> torch.Tensor:
        return self.fc(f) if bias else f @ self.fc.weight.T

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """2048-d pool3 features of images in [−1, 1] (resized to 299x299)."""
        return self._trunk(self.prepare(x))[0]

    def spatial_features(self, x: torch.Tensor) -> torch.Tensor:
        """2023-d sFID features: ``mixed_6/conv`` (``Mixed_6d.branch1x1``) channels 0..6, (H, W, C) order."""
        return self._trunk(self.prepare(x), spatial=True)[1]

    def logits(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """1008-way logits (index 0 is the unused background class of the 2015 graph); ``bias=False``
        gives pool3 · Wᵀ, the logits of the Inception Score in the ADM / improved-gan code."""
        return self._head(self.features(x), bias)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, self.fc(f)

    def outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One pass for every metric: ``features`` (pool3, FID and precision/recall), ``logits`` (without
        the fc bias, for the Inception Score as ADM computes it) and ``spatial`` (sFID)."""
        f, s = self._trunk(self.prepare(x), spatial=True)
        return {"features": f, "logits": self._head(f, bias=False), "spatial": s}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def load_inception_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a ``torch.save`` file holding only tensors.

    The format is read from the file's first bytes (not its name). A ``torch.save`` file is read with
    ``torch.load(weights_only=True)`` and only on torch >= 2.6 (earlier releases have a known
    ``weights_only`` bypass, CVE-2025-32434); plain pickles and anything else are refused. Unwraps
    ``{"state_dict": ...}`` and strips a ``module.`` prefix.

    Raises:
        FileNotFoundError: no file at ``path``.
        EvalInputError (a ValueError): not safetensors nor a weights-only ``torch.save`` state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {path}. deltafm never downloads them: place the FID Inception "
            "weights (e.g. pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or a safetensors copy) "
            "at that path, or use a 'classifier:PATH' extractor instead."
        )
    kind = sniff_weights_format(path)
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except SafetensorError as err:
            raise EvalInputError(f"{path}: damaged safetensors file ({err})") from None
    elif kind == "torch":
        state = load_weights_only(path, EvalInputError)
    else:
        raise EvalInputError(
            f"{path} is neither a safetensors file nor a torch.save state dict (a plain pickle, or not weights "
            "at all); Inception weights must be safetensors, or a torch.save file of tensors only"
        )
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EvalInputError(f"{path} does not hold a state dict of tensors")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def load_inception(path: str | os.PathLike) -> FIDInceptionV3:
    """Build :class:`FIDInceptionV3` and load weights from a local file (eval mode).

    Key checks: every parameter and buffer must be present with the right shape, except BatchNorm's
    ``num_batches_tracked`` counters (unused in eval mode; older files lack them). Keys of an auxiliary
    head (``AuxLogits.*``, torchvision checkpoints) are ignored; any other unknown key is an error.

    Raises:
        FileNotFoundError: no file at ``path``.
        EvalKeyError (a KeyError and an EvalInputError): missing or unexpected keys (listed).
        EvalInputError (a ValueError): shape mismatches (listed), or a file that is not safetensors nor a
            weights-only state dict (see :func:`load_inception_state_dict`).
    """
    from deltafm.eval.classifier import file_sha256

    state = {k: v for k, v in load_inception_state_dict(path).items() if not k.startswith("AuxLogits.")}
    model = FIDInceptionV3()
    own = model.state_dict()
    optional = {k for k in own if k.endswith("num_batches_tracked")}
    missing = sorted(set(own) - set(state) - optional)
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise EvalKeyError(
            f"{path}: state dict does not match the FID Inception-v3 layout; "
            f"missing {len(missing)} keys {missing[:8]}, unexpected {len(unexpected)} keys {unexpected[:8]}"
        )
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise EvalInputError(f"{path}: shape mismatches: {wrong[:8]}")
    for k in optional - set(state):
        state[k] = own[k]
    model.load_state_dict(state, strict=True)
    model.extractor_id = f"inception:{file_sha256(path)}"
    return model.eval()


def convert_inception(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Convert FID Inception weights (e.g. pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``) once to
    a safetensors file; returns the sha256 of the new file.

    The source is read like :func:`load_inception` reads it (``weights_only=True``, torch >= 2.6) and its
    layout checked by loading it into :class:`FIDInceptionV3`; the file written holds that model's state
    dict (``AuxLogits.*`` dropped, ``module.`` prefixes stripped). Its extractor id differs from the
    source's (the id is the file's hash): recompute reference statistics made with the ``.pth``.
    """
    from safetensors.torch import save_file

    from deltafm.eval.classifier import file_sha256

    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise EvalInputError(f"--out {dst} would overwrite the input; choose another path")
    model = load_inception(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(dst), metadata={"source_sha256": file_sha256(src), "format": "fid-inception-v3"})
    return file_sha256(dst)
