"""Named model presets: ``build_model("SiT-XL/2", in_channels=4, image_size=32, num_classes=1000)``.

SiT sizes follow the DiT/SiT papers (depth / hidden / heads): S 12/384/6, B 12/768/12, L 24/1024/16,
XL 28/1152/16, each with patch 2, 4 or 8. Two small presets for CPU work: T 6/192/3 and N 4/128/4.
UNet presets (ADM-style, see ``unet.py``; params and forward FLOPs for 28×28×1, 10 classes):
``unet-t`` base 16, 1 block/level, no attention (0.29M, 94 MFLOP; tests), ``unet-s`` base 32,
1 block/level, attention at 7×7 (1.19M, 380 MFLOP; default for Fashion-MNIST on CPU), ``unet-b``
base 64, 2 blocks/level, attention at 14×14 and 7×7 (7.3M, 2.4 GFLOP).

MMDiT presets (text-to-image, see ``mmdit.py``), all with 32-wide heads: ``MMDiT-d{depth}/{patch}`` follow
the reference's rule hidden = 32·depth, heads = depth, for depth 12, 16, 20, 24 (d24 is the reference's
default: 768 wide, 24 heads); ``MMDiT-N`` 4 blocks / 128 / 4 heads and ``MMDiT-T`` 6 / 192 / 6 for CPU work;
patch 1, 2 or 4. They take the text widths as overrides (``text_dim``, ``pooled_dim``; ``conditions`` for
named labels); ``num_classes`` is recorded, never embedded.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn as nn

from deltafm.models.mmdit import MMDiT, mmdit_size
from deltafm.models.sit import SiT
from deltafm.models.unet import UNet

__all__ = ["build_model", "list_models", "model_preset"]

_SIT_SIZES: dict[str, dict[str, int]] = {
    "N": dict(depth=4, hidden_size=128, num_heads=4),
    "T": dict(depth=6, hidden_size=192, num_heads=3),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}

_PRESETS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    f"SiT-{size}/{patch}": (SiT, dict(cfg, patch_size=patch))
    for size, cfg in _SIT_SIZES.items()
    for patch in (1, 2, 4, 8)
}
_PRESETS.update(
    {
        "unet-t": (UNet, dict(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attn_levels=())),
        "unet-s": (UNet, dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attn_levels=(2,))),
        "unet-b": (
            UNet,
            dict(base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attn_levels=(1, 2)),
        ),
    }
)
_MMDIT_SIZES: dict[str, dict[str, int]] = {
    "N": dict(depth=4, hidden_size=128, num_heads=4),
    "T": dict(depth=6, hidden_size=192, num_heads=6),
    **{f"d{d}": dict(depth=d, hidden_size=mmdit_size(d)[0], num_heads=mmdit_size(d)[1]) for d in (12, 16, 20, 24)},
}
_PRESETS.update(
    {
        f"MMDiT-{size}/{patch}": (MMDiT, dict(cfg, patch_size=patch))
        for size, cfg in _MMDIT_SIZES.items()
        for patch in (1, 2, 4)
    }
)
_BY_KEY = {name.lower(): name for name in _PRESETS}


def list_models() -> list[str]:
    """All preset names, in registry order."""
    return list(_PRESETS)


def _lookup(name: str) -> str:
    key = _BY_KEY.get(name.lower())
    if key is None:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return key


def model_preset(name: str) -> tuple[type[nn.Module], dict[str, Any]]:
    """The model class and a copy of the preset keyword arguments for ``name`` (case-insensitive)."""
    cls, kwargs = _PRESETS[_lookup(name)]
    return cls, dict(kwargs)


def build_model(
    name: str, *, in_channels: int, image_size: int | tuple[int, int], num_classes: int, **overrides: Any
) -> nn.Module:
    """Build the preset ``name`` for the given data; ``overrides`` replace preset arguments.

    Names are matched case-insensitively. An unknown name, or an override the model class does not
    take, raises ValueError (no keyword is silently swallowed).
    """
    cls, kwargs = model_preset(name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(f"{cls.__name__} ({name}) takes no argument(s) {unknown}; accepted: {sorted(accepted)}")
    kwargs.update(overrides)
    return cls(in_channels=in_channels, image_size=image_size, num_classes=num_classes, **kwargs)
