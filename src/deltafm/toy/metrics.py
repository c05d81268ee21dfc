"""Metrics for the toy study: distances between sample sets, class accuracy and the Bayes rate,
overlap of class velocity fields, and trajectory straightness.

* :func:`exact_w2`: W2 between two equal-size empirical measures,
  W2(a, b)² = min_σ (1/n) Σ_i ‖a_i − b_σ(i)‖², solved exactly as an assignment problem.
* :func:`sliced_w2`: sliced W2, SW2² = E_θ W2²(⟨a, θ⟩, ⟨b, θ⟩) over random unit directions θ; in 1-D
  the optimal coupling of two equal-size sets matches sorted values.
* :func:`class_accuracy`: fraction of samples x generated for class y with argmax_k π_k p(x | k) = y.
* :func:`bayes_rate`: the best achievable accuracy ∫ max_k π_k p(x | k) dx, by a midpoint rule on a
  grid over the dataset's bounds (closed form for the paper dataset: Φ(d / 2σ)).
* :func:`field_overlap`: for the fields v_k(x) of K classes at the same points x, the fraction of
  (point, class pair) where the angle between v_i(x) and v_j(x) is below a threshold, and the mean
  angle in degrees.
* :func:`straightness`: ‖x_T − x_0‖ / Σ_k ‖x_{k+1} − x_k‖ per trajectory (1 = a straight line).
* :func:`path_deviation`: the straightness of Liu et al. (rectified flow),
  S = ∫_0^1 ‖ẋ_t − (x_1 − x_0)‖² dt on the discrete path (0 = straight, at constant speed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from deltafm.toy.datasets import PaperGaussians, ToyDataset

__all__ = [
    "exact_w2",
    "sliced_w2",
    "class_accuracy",
    "bayes_rate",
    "field_overlap",
    "straightness",
    "path_deviation",
    "binomial_tolerance",
]


def exact_w2(a: Tensor, b: Tensor) -> float:
    """Exact W2 between equal-size point sets (n, d) via the optimal assignment (Hungarian)."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two (n, d) sets of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    cost = torch.cdist(a64, b64).pow(2).numpy()
    if not np.isfinite(cost).all():
        return math.inf
    rows, cols = linear_sum_assignment(cost)
    return float(math.sqrt(cost[rows, cols].mean()))


def sliced_w2(a: Tensor, b: Tensor, num_projections: int = 256, generator: torch.Generator | None = None) -> float:
    """Sliced W2 between equal-size sets (n, d): sqrt of the mean over random directions of the
    squared 1-D W2, each computed by matching sorted projections."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two (n, d) sets of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    theta = torch.randn(a.shape[1], num_projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa = (a.detach().double().cpu() @ theta).sort(dim=0).values
    pb = (b.detach().double().cpu() @ theta).sort(dim=0).values
    return float((pa - pb).pow(2).mean().sqrt())


def class_accuracy(dataset: ToyDataset, x: Tensor, y: Tensor) -> float:
    """Fraction of samples ``x`` (generated for labels ``y``) that the Bayes classifier assigns to ``y``."""
    if x.shape[0] == 0:
        return math.nan
    pred = dataset.classify(x.detach().cpu())
    ok = torch.isfinite(x.detach().cpu()).all(dim=1)
    return float(((pred == y.cpu()) & ok).double().mean())


def bayes_rate(dataset: ToyDataset, resolution: int = 400, bounds: Sequence[float] | None = None) -> float:
    """∫ max_k π_k p(x | k) dx: exact for the paper dataset, otherwise a midpoint rule on a
    ``resolution``² grid over ``bounds`` (default: the dataset's bounds)."""
    if isinstance(dataset, PaperGaussians) and dataset.num_classes == 2 and bounds is None:
        return dataset.bayes_rate_exact()
    x0, x1, y0, y1 = bounds if bounds is not None else dataset.bounds
    hx, hy = (x1 - x0) / resolution, (y1 - y0) / resolution
    xs = x0 + hx * (torch.arange(resolution, dtype=torch.float64) + 0.5)
    ys = y0 + hy * (torch.arange(resolution, dtype=torch.float64) + 0.5)
    grid = torch.cartesian_prod(xs, ys)
    best = dataset.log_prob_joint(grid).max(dim=1).values.exp()
    return float(best.sum() * hx * hy)


def binomial_tolerance(p: float, n: int, z: float = 4.0) -> float:
    """z standard errors of a proportion p estimated from n draws: z sqrt(p (1 − p) / n)."""
    return z * math.sqrt(max(p * (1.0 - p), 1.0 / n) / n)


def field_overlap(fields: Tensor, angle_deg: float = 5.0, eps: float = 1e-12) -> dict[str, float]:
    """Overlap of K class velocity fields evaluated at the same N points.

    Args:
        fields: (K, N, d) with fields[k, n] = v(x_n, t | class k).
        angle_deg: two fields "overlap" at a point when the angle between them is below this.

    Returns ``{"overlap": fraction of (point, pair) within angle_deg, "angle_deg": mean angle,
    "cosine": mean cosine}`` averaged over all K(K − 1)/2 class pairs.
    """
    if fields.ndim != 3 or fields.shape[0] < 2:
        raise ValueError(f"fields must be (K >= 2, N, d), got {tuple(fields.shape)}")
    f = fields.detach().double()
    unit = f / f.norm(dim=-1, keepdim=True).clamp_min(eps)
    i, j = torch.triu_indices(f.shape[0], f.shape[0], offset=1)
    cos = (unit[i] * unit[j]).sum(-1).clamp(-1.0, 1.0)  # (pairs, N)
    ang = torch.rad2deg(torch.arccos(cos))
    return {
        "overlap": float((ang < angle_deg).double().mean()),
        "angle_deg": float(ang.mean()),
        "cosine": float(cos.mean()),
    }


def straightness(trajectory: Sequence[Tensor] | Tensor) -> Tensor:
    """Per-sample ‖x_T − x_0‖ / Σ_k ‖x_{k+1} − x_k‖ for states (T + 1, B, d); 1 means straight."""
    traj = torch.stack(list(trajectory)) if not isinstance(trajectory, Tensor) else trajectory
    traj = traj.detach().double()
    if traj.shape[0] < 2:
        raise ValueError("a trajectory needs at least two states")
    length = (traj[1:] - traj[:-1]).norm(dim=-1).sum(0)
    chord = (traj[-1] - traj[0]).norm(dim=-1)
    return torch.where(length > 0, chord / length.clamp_min(1e-300), torch.ones_like(chord))


def path_deviation(trajectory: Sequence[Tensor] | Tensor, times: Tensor | None = None) -> Tensor:
    """Per-sample Σ_k h_k ‖(x_{k+1} − x_k)/h_k − (x_T − x_0)/(t_T − t_0)‖² for states (T + 1, B, d) at
    ``times`` (default: a uniform grid on [0, 1]); the discrete ∫ ‖ẋ_t − (x_1 − x_0)‖² dt."""
    traj = torch.stack(list(trajectory)) if not isinstance(trajectory, Tensor) else trajectory
    traj = traj.detach().double()
    steps = traj.shape[0] - 1
    if steps < 1:
        raise ValueError("a trajectory needs at least two states")
    ts = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64) if times is None else times.double().cpu()
    h = (ts[1:] - ts[:-1]).reshape(-1, *([1] * (traj.dim() - 1)))
    vel = (traj[1:] - traj[:-1]) / h
    mean_vel = (traj[-1] - traj[0]) / (ts[-1] - ts[0])
    return ((vel - mean_vel) ** 2).sum(-1).mul(h.squeeze(-1)).sum(0)
