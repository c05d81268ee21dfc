"""Probability paths between a source (noise) and data.

Convention used throughout deltafm: ``t`` runs in ``[0, 1]`` with **t = 0 the source (noise)
and t = 1 the data**.  A path is fixed by four scalar functions of ``t``::

    x_t = α_t · x1 + σ_t · x0            (x1: data, x0: source sample, e.g. ε ~ N(0, I))
    u_t = α̇_t · x1 + σ̇_t · x0            (the conditional target velocity dx_t/dt)

Everything else (predicted data / noise from a velocity and back) follows from these four
numbers, so each path only implements ``alpha``, ``sigma``, ``d_alpha`` and ``d_sigma``.

The source does not have to be standard noise: ``x0`` can be any sample of a source
distribution (the toy study transports a Gaussian at (-15, 0)).

REPA and the ΔFM reference code run time the other way: ``t_ref = 1 - t`` with their ``t_ref = 0``
being data, and their velocity is ``u_ref = dx/dt_ref = -u``.  Use :func:`to_reference_time` and
:func:`from_reference_time` to convert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "PathSample",
    "ProbPath",
    "LinearPath",
    "CosinePath",
    "VPPath",
    "get_path",
    "PATHS",
    "to_reference_time",
    "from_reference_time",
]


def _expand(coef: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample coefficient of shape (B,) so it broadcasts against ``like`` (B, ...)."""
    return coef.reshape(coef.shape + (1,) * (like.dim() - coef.dim())).to(like.dtype)


def _check_t(t: Tensor, x: Tensor) -> None:
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")


@dataclass
class PathSample:
    """A point on the path: time ``t`` (B,), ``x_t``, target velocity ``u``, and the endpoints."""

    t: Tensor
    x_t: Tensor
    u: Tensor
    x1: Tensor
    x0: Tensor


class ProbPath:
    """Base class of an affine probability path ``x_t = α_t x1 + σ_t x0``.

    Subclasses implement the four scalar schedules; inputs are tensors of any shape.
    """

    name: str = "path"

    def alpha(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- sampling ---------------------------------------------------------------------------
    def interpolate(self, x1: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """x_t = α_t x1 + σ_t x0."""
        _check_t(t, x1)
        return _expand(self.alpha(t), x1) * x1 + _expand(self.sigma(t), x0) * x0

    def target(self, x1: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """Conditional target velocity u_t = α̇_t x1 + σ̇_t x0."""
        _check_t(t, x1)
        return _expand(self.d_alpha(t), x1) * x1 + _expand(self.d_sigma(t), x0) * x0

    def sample(self, x1: Tensor, x0: Tensor, t: Tensor) -> PathSample:
        """Return x_t and u_t for data ``x1``, source ``x0`` and times ``t`` of shape (B,)."""
        if x1.shape != x0.shape:
            raise ValueError(f"x1 and x0 must have the same shape, got {tuple(x1.shape)} and {tuple(x0.shape)}")
        return PathSample(t=t, x_t=self.interpolate(x1, x0, t), u=self.target(x1, x0, t), x1=x1, x0=x0)

    # -- conversions ------------------------------------------------------------------------
    # Solve the 2x2 linear system  [x_t; v] = [[α, σ], [α̇, σ̇]] [x1; x0]  for the missing pieces.
    def _det(self, t: Tensor) -> Tensor:
        return self.alpha(t) * self.d_sigma(t) - self.sigma(t) * self.d_alpha(t)

    def velocity_to_data(self, v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Predicted data x̂1 = (σ̇ x_t − σ v) / (α σ̇ − σ α̇)."""
        det = self._det(t)
        return (_expand(self.d_sigma(t) / det, x_t) * x_t) - _expand(self.sigma(t) / det, v) * v

    def velocity_to_noise(self, v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Predicted source x̂0 = (α v − α̇ x_t) / (α σ̇ − σ α̇)."""
        det = self._det(t)
        return _expand(self.alpha(t) / det, v) * v - _expand(self.d_alpha(t) / det, x_t) * x_t

    def data_to_velocity(self, x1_hat: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """v = α̇ x̂1 + σ̇ x̂0 with x̂0 = (x_t − α x̂1) / σ."""
        x0_hat = (x_t - _expand(self.alpha(t), x_t) * x1_hat) / _expand(self.sigma(t), x_t)
        return _expand(self.d_alpha(t), x1_hat) * x1_hat + _expand(self.d_sigma(t), x0_hat) * x0_hat

    def noise_to_velocity(self, x0_hat: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """v = α̇ x̂1 + σ̇ x̂0 with x̂1 = (x_t − σ x̂0) / α."""
        x1_hat = (x_t - _expand(self.sigma(t), x_t) * x0_hat) / _expand(self.alpha(t), x_t)
        return _expand(self.d_alpha(t), x1_hat) * x1_hat + _expand(self.d_sigma(t), x0_hat) * x0_hat

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearPath(ProbPath):
    """Rectified-flow / SiT linear path: α_t = t, σ_t = 1 − t, so u = x1 − x0."""

    name = "linear"

    def alpha(self, t: Tensor) -> Tensor:
        return t

    def sigma(self, t: Tensor) -> Tensor:
        return 1 - t

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)


class CosinePath(ProbPath):
    """Cosine / GVP path (SiT's "GVP"): α_t = sin(πt/2), σ_t = cos(πt/2); α² + σ² = 1."""

    name = "cosine"

    def alpha(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * t)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * t)

    def d_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


class VPPath(ProbPath):
    """Variance-preserving (DDPM/score-SDE) path with a linear β schedule, in our time direction.

    With s = 1 − t (diffusion time, s = 0 data) and B(s) = β_min s + ½(β_max − β_min) s²:
    α_t = exp(−½ B(s)), σ_t = sqrt(1 − α_t²).  At t = 0 the signal is tiny but not exactly zero
    (α_0 = exp(−½ B(1)) ≈ 6.7e-3 for the default β's), as in the VP SDE.
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"need 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min = beta_min
        self.beta_max = beta_max

    def _big_b(self, s: Tensor) -> Tensor:
        return self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s**2

    def _beta(self, s: Tensor) -> Tensor:
        return self.beta_min + (self.beta_max - self.beta_min) * s

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-0.5 * self._big_b(1 - t))

    def sigma(self, t: Tensor) -> Tensor:
        a = self.alpha(t)
        return torch.sqrt(torch.clamp(1 - a * a, min=0))

    def d_alpha(self, t: Tensor) -> Tensor:
        # dα/dt = dα/ds · ds/dt = (−½ β(s) α) · (−1)
        return 0.5 * self._beta(1 - t) * self.alpha(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        # σ² = 1 − α²  ⇒  σ̇ = −α α̇ / σ
        a = self.alpha(t)
        return -a * self.d_alpha(t) / self.sigma(t)

    def __repr__(self) -> str:
        return f"VPPath(beta_min={self.beta_min}, beta_max={self.beta_max})"


PATHS: dict[str, type[ProbPath]] = {"linear": LinearPath, "cosine": CosinePath, "gvp": CosinePath, "vp": VPPath}


def get_path(path: str | ProbPath, **kwargs: float) -> ProbPath:
    """Return a path instance from a name (``linear``, ``cosine``/``gvp``, ``vp``) or pass one through."""
    if isinstance(path, ProbPath):
        return path
    try:
        cls = PATHS[path]
    except KeyError:
        raise ValueError(f"unknown path {path!r}; known: {sorted(PATHS)}") from None
    return cls(**kwargs)


def to_reference_time(t: Tensor, u: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Convert our (t, u) to the REPA / ΔFM-reference convention: t_ref = 1 − t, u_ref = −u."""
    if u is None:
        return 1 - t
    return 1 - t, -u


def from_reference_time(t_ref: Tensor, u_ref: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Inverse of :func:`to_reference_time`: t = 1 − t_ref, u = −u_ref."""
    if u_ref is None:
        return 1 - t_ref
    return 1 - t_ref, -u_ref
