"""Training-time samplers of t and sampling-time grids.

All in the deltafm convention (t = 0 noise, t = 1 data).  Every sampler takes an optional
``torch.Generator`` so that draws are reproducible.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["TimeSampler", "UniformTime", "LogitNormalTime", "ModeTime", "get_time_sampler", "time_grid"]


class TimeSampler:
    """Draws training times t ∈ [0, 1] of shape (n,)."""

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _uniform(self, n: int, generator, device, dtype) -> Tensor:
        gen_device = generator.device if generator is not None else device
        return torch.rand(n, generator=generator, device=gen_device, dtype=dtype).to(device)


class UniformTime(TimeSampler):
    """t ~ U(0, 1) (the paper's setting)."""

    def sample(self, n, generator=None, device=None, dtype=torch.float32):
        return self._uniform(n, generator, device, dtype)

    def __repr__(self) -> str:
        return "UniformTime()"


class LogitNormalTime(TimeSampler):
    """t = sigmoid(m + s·n), n ~ N(0, 1) (SD3's logit-normal).

    In our direction a positive ``mean`` puts more mass near the data (t → 1); SD3's
    ``m`` (noise-level convention) corresponds to ``mean = -m`` here.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        if std <= 0:
            raise ValueError(f"logit-normal std must be > 0, got {std}")
        self.mean, self.std = float(mean), float(std)

    def sample(self, n, generator=None, device=None, dtype=torch.float32):
        gen_device = generator.device if generator is not None else device
        z = torch.randn(n, generator=generator, device=gen_device, dtype=dtype).to(device)
        return torch.sigmoid(self.mean + self.std * z)

    def __repr__(self) -> str:
        return f"LogitNormalTime(mean={self.mean}, std={self.std})"


class ModeTime(TimeSampler):
    """SD3's "mode" sampler with heavy-tail ``scale`` s: with u ~ U(0, 1), noise level
    τ = 1 − u − s·(cos²(πu/2) − 1 + u), and t = 1 − τ.  s = 0 is uniform; s must lie in
    [-1, 2/(π − 2)] for τ to stay monotone in u.
    """

    def __init__(self, scale: float = 1.29) -> None:
        if not -1.0 <= scale <= 2.0 / (math.pi - 2.0):
            raise ValueError(f"mode scale must be in [-1, {2 / (math.pi - 2):.4f}], got {scale}")
        self.scale = float(scale)

    def sample(self, n, generator=None, device=None, dtype=torch.float32):
        u = self._uniform(n, generator, device, dtype)
        tau = 1 - u - self.scale * (torch.cos(0.5 * math.pi * u) ** 2 - 1 + u)
        return (1 - tau).clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return f"ModeTime(scale={self.scale})"


_SAMPLERS = {"uniform": UniformTime, "logit_normal": LogitNormalTime, "mode": ModeTime}


def get_time_sampler(name: str | TimeSampler, **kwargs: float) -> TimeSampler:
    """Build a time sampler by name: ``uniform``, ``logit_normal`` (mean, std), ``mode`` (scale)."""
    if isinstance(name, TimeSampler):
        return name
    key = name.replace("-", "_")
    if key not in _SAMPLERS:
        raise ValueError(f"unknown time sampler {name!r}; known: {sorted(_SAMPLERS)}")
    return _SAMPLERS[key](**kwargs)


def time_grid(
    steps: int,
    t_start: float = 0.0,
    t_end: float = 1.0,
    shift: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """A sampling grid of ``steps + 1`` times from ``t_start`` to ``t_end``.

    ``shift`` > 1 spends more steps near the noise (SD3 time shift on the noise level
    τ = 1 − t: τ' = s·τ / (1 + (s − 1)·τ)); ``shift = 1`` is the uniform grid.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    grid = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    if shift != 1.0:
        tau = 1 - grid
        grid = 1 - shift * tau / (1 + (shift - 1) * tau)
    return grid.to(device=device, dtype=dtype)
