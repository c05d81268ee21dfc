"""Fréchet distance between Gaussians fitted to feature sets (FD; FID with Inception pool3 features).

    FD = ‖μ₁ − μ₂‖² + tr(Σ₁) + tr(Σ₂) − 2 tr((Σ₁ Σ₂)^{1/2})

Three routes to tr((Σ₁Σ₂)^{1/2}): ``scipy.linalg.sqrtm`` (the FID convention of the TTUR / pytorch-fid / ADM
code), symmetric eigendecompositions (``eigh``), and, from the features of one set, an N x N eigenproblem
(:func:`frechet_distance_lowrank`). Re-exported by :mod:`deltafm.eval.metrics`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "frechet_distance_lowrank",
]


def _as_numpy(x: ArrayLike, dtype: Any = np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------


def feature_statistics(feats: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a feature set, in float64.

    μ = (1/N) Σ_n f_n and Σ = 1/(N−1) Σ_n (f_n − μ)(f_n − μ)ᵀ (the unbiased estimate, as in the
    FID reference code, which uses ``np.cov``).

    Args:
        feats: (N, D) features, N ≥ 2.

    Returns:
        ``(mu, sigma)`` with shapes (D,) and (D, D).
    """
    f = _as_numpy(feats)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError("need at least 2 feature vectors for a covariance")
    mu = f.mean(axis=0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)
    return mu, sigma


def _trace_sqrt_product_sqrtm(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
    """tr((Σ₁Σ₂)^{1/2}) with ``scipy.linalg.sqrtm`` in the FID convention.

    If the square root is not finite (Σ₁Σ₂ singular or nearly so), ε·I is added to both covariances
    and the root recomputed. A complex result is accepted only when the imaginary part of its diagonal
    is negligible (< 1e-3, the FID convention), and then dropped.
    """
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > 1e-3:
            raise ValueError(f"matrix square root has a large imaginary component ({imag:.3g})")
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr((Σ₁Σ₂)^{1/2}) through symmetric eigendecompositions.

    Σ₁Σ₂ is similar to the PSD matrix M = Σ₁^{1/2} Σ₂ Σ₁^{1/2}, so the wanted trace is Σ_i √λ_i(M).
    Eigenvalues that round-off makes slightly negative are clipped to 0. No complex arithmetic.
    """
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root1 @ s2 @ root1
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def frechet_distance(
    mu1: ArrayLike,
    sigma1: ArrayLike,
    mu2: ArrayLike,
    sigma2: ArrayLike,
    eps: float = 1e-6,
    method: str = "sqrtm",
) -> float:
    """Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂).

        FD = ‖μ₁ − μ₂‖² + tr(Σ₁) + tr(Σ₂) − 2 tr((Σ₁ Σ₂)^{1/2})

    Args:
        mu1, sigma1: mean (D,) and covariance (D, D) of the first set.
        mu2, sigma2: same for the second set.
        eps: diagonal offset used when the matrix square root is not finite (``method="sqrtm"``).
        method: ``"sqrtm"`` (the FID convention, ``scipy.linalg.sqrtm`` of Σ₁Σ₂) or ``"eigh"``
            (symmetric eigendecompositions; exact for PSD inputs and free of complex parts).

    Returns:
        The distance as a Python float. Round-off can make it slightly negative (≈ −1e-10) for
        identical inputs; it is not clipped.
    """
    m1, m2 = _as_numpy(mu1).reshape(-1), _as_numpy(mu2).reshape(-1)
    s1, s2 = np.atleast_2d(_as_numpy(sigma1)), np.atleast_2d(_as_numpy(sigma2))
    if m1.shape != m2.shape:
        raise ValueError(f"mean shapes differ: {m1.shape} vs {m2.shape}")
    d = m1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}), got {s1.shape} and {s2.shape}")
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(s1, s2, eps)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(s1, s2)
    else:
        raise ValueError(f"unknown method {method!r}; use 'sqrtm' or 'eigh'")
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def frechet_distance_lowrank(feats1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """FD between the Gaussian fitted to the features ``feats1`` (N, D) and N(μ₂, Σ₂), exactly, in O(N D²).

    With A = (F − μ₁) / √(N−1) (N × D), Σ₁ = AᵀA, and the non-zero eigenvalues of Σ₁Σ₂ = AᵀAΣ₂ are those
    of the N × N PSD matrix A Σ₂ Aᵀ, so tr((Σ₁Σ₂)^{1/2}) = Σᵢ √λᵢ(A Σ₂ Aᵀ). No D × D square root: for
    N ≤ D (a rank-deficient Σ₁, where ``scipy.linalg.sqrtm`` of the singular product is slow and
    inaccurate) this is the cheap and exact route; eigenvalues at the round-off floor (below N ε λ_max, which
    includes those round-off makes negative) count as the zeros they are. For N > D the roles swap (A Σ₂ Aᵀ has
    N − D zero eigenvalues, which the floor removes only as far as round-off allows): use
    :func:`frechet_distance` there.
    """
    f = _as_numpy(feats1)
    m2, s2 = _as_numpy(mu2).reshape(-1), np.atleast_2d(_as_numpy(sigma2))
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {f.shape}")
    d = f.shape[1]
    if m2.shape != (d,) or s2.shape != (d, d):
        raise ValueError(f"features are {d}-d but the statistics are {m2.shape}, {s2.shape}")
    mu1 = f.mean(axis=0)
    a = (f - mu1) / math.sqrt(f.shape[0] - 1)
    m = a @ s2 @ a.T
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    # eigenvalues at the round-off floor of the largest are zeros of the exact matrix (A Σ₂ Aᵀ has rank ≤ N − 1);
    # their square roots would add ~√(ε λ_max) each, a 1e-7 relative error, with the sign LAPACK happens to give
    floor = max(float(lam.max(initial=0.0)), 0.0) * len(lam) * np.finfo(np.float64).eps
    lam = np.where(lam > floor, lam, 0.0)
    diff = mu1 - m2
    return float(diff @ diff + np.sum(a * a) + np.trace(s2) - 2.0 * np.sqrt(lam).sum())


def frechet_distance_from_features(feats1: ArrayLike, feats2: ArrayLike, **kw: Any) -> float:
    """FD between the Gaussians fitted to two feature sets (see :func:`frechet_distance`)."""
    mu1, s1 = feature_statistics(feats1)
    mu2, s2 = feature_statistics(feats2)
    return frechet_distance(mu1, s1, mu2, s2, **kw)
