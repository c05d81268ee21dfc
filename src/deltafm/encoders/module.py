"""Any torch module as a REPA encoder: :class:`ModuleEncoder`.

The module maps preprocessed pixels w (B, 3, H', W') (see :mod:`deltafm.encoders.base`: [0, 1], then
(u − μ) / σ with the ``mean``/``std`` given here) to tokens (B, N, D). Two kinds:

* a **patch** encoder (``patch_size`` p): it sees w resized to (gh·p, gw·p) and must return gh·gw tokens
  (after dropping ``prefix_tokens`` leading ones, e.g. a class token);
* a **fixed-size** encoder (``resolution`` R, an int or (H, W)): it sees w resized to R and returns a square
  grid of g² tokens, resampled to (gh, gw) by :func:`deltafm.alignment.match_token_grid`.

Its identity is a SHA-256 of the module's state dict, the name, the width, the normalisation and the
geometry, so two encoders with the same weights and settings agree and any changed weight changes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor, nn

from .base import IMAGENET_MEAN, IMAGENET_STD, EncoderError, ImageEncoder, state_digest

__all__ = ["ModuleEncoder"]


class ModuleEncoder(ImageEncoder):
    """Wrap ``module`` (preprocessed pixels (B, 3, H', W') → (B, N, D) tokens) as a frozen :class:`ImageEncoder`.

    Args:
        module: the network; it is put in eval mode and frozen (shared, not copied).
        name: short name (sanitised to [A-Za-z0-9._-]).
        embed_dim: D, the width of the tokens the module returns (checked on every call).
        mean, std: per-channel normalisation of pixels in [0, 1] (default ImageNet's).
        patch_size: p for a patch encoder, or None with ``resolution`` for a fixed-size one.
        resolution: the fixed input side R (int) or (H, W).
        prefix_tokens: leading tokens to drop from the module's output (class / register tokens).
    """

    def __init__(self, module: nn.Module, name: str, embed_dim: int, mean: Iterable[float] = IMAGENET_MEAN,
                 std: Iterable[float] = IMAGENET_STD, patch_size: int | None = None,
                 resolution: int | Sequence[int] | None = None, prefix_tokens: int = 0) -> None:
        if not isinstance(module, nn.Module):
            raise EncoderError(f"ModuleEncoder wraps a torch nn.Module, got {type(module).__name__}")
        if int(prefix_tokens) < 0:
            raise EncoderError(f"encoder {name!r}: prefix_tokens must be >= 0, got {prefix_tokens}")
        super().__init__(name, embed_dim, mean, std, patch_size=patch_size, resolution=resolution)
        self.module = module
        self.prefix_tokens = int(prefix_tokens)
        self.freeze()
        meta = dict(name=self.name, cls=type(module).__name__, embed_dim=self.embed_dim, mean=self.image_mean,
                    std=self.image_std, patch_size=self.patch_size, resolution=self.resolution,
                    prefix_tokens=self.prefix_tokens)
        self.identity = state_digest(type(module).__name__, meta, module.state_dict())

    def encode(self, pixels: Tensor) -> Tensor:
        out = self.module(pixels)
        if isinstance(out, Tensor) and out.ndim == 3 and self.prefix_tokens:
            out = out[:, self.prefix_tokens:]
        return out
