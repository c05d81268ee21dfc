"""Pixel normalisation, defined once for the whole package.

    images:  uint8 p ∈ {0, …, 255}  ->  x = p / 127.5 − 1 ∈ [−1, 1]            (:func:`uint8_to_model`)
             inverse for saving:     p = round((x + 1) · 127.5) clipped to [0, 255]   (:func:`model_to_uint8`)

The inverse is exact on the image of the forward map: ``model_to_uint8(uint8_to_model(p)) == p`` for all
256 values (the float32 rounding error is ~1e-5, far below the 0.5 of the rounding). Training data,
sample files, the feature extractors and the classifier all go through these functions.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["uint8_to_model", "model_to_uint8", "images_to_model", "to_uint8_nhwc"]


def uint8_to_model(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map uint8 pixels p ∈ [0, 255] to model space x = p / 127.5 − 1 ∈ [−1, 1]."""
    if x.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 tensor, got {x.dtype}")
    return x.to(dtype) / 127.5 - 1.0


def model_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`uint8_to_model` for saving: p = round((x + 1) · 127.5), clipped to [0, 255]."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def images_to_model(images: np.ndarray | torch.Tensor, layout: str = "NCHW") -> torch.Tensor:
    """A batch of images -> float32 (N, C, H, W) in model space.

    Args:
        images: uint8 pixels of shape (N, H, W) (one channel), (N, C, H, W) or (N, H, W, C), mapped with
            :func:`uint8_to_model`; float input is taken to be in model space already and only re-laid out.
        layout: ``"NCHW"`` or ``"NHWC"`` (the ADM sample layout) for 4-d input.
    """
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        elif layout != "NCHW":
            raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    else:
        raise ValueError(f"images must be 3-d or 4-d, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return uint8_to_model(x)
    if not x.dtype.is_floating_point:
        raise TypeError(f"expected uint8 pixels or float model-space images, got {x.dtype}")
    return x.float()


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """Model-space images (N×C×H×W) -> uint8 N×H×W×C numpy array (the ADM sample layout)."""
    return model_to_uint8(x).permute(0, 2, 3, 1).contiguous().numpy()
