"""Kernel Inception Distance (KID, Bińkowski et al. 2018) on any feature space.

KID is the squared maximum mean discrepancy between the feature distributions of samples X and real
images Y under the cubic polynomial kernel

    k(x, y) = (xᵀy / d + 1)³          (d = feature dimension)

estimated without bias (the U-statistic) on m-element subsets:

    MMD²_u = 1/(m(m−1)) Σ_{i≠j} k(x_i, x_j) + 1/(m(m−1)) Σ_{i≠j} k(y_i, y_j) − 2/m² Σ_{i,j} k(x_i, y_j),

averaged over ``subsets`` random subset pairs (each drawn without replacement from X and from Y), with the
standard deviation over subsets. Unlike FD, the estimator is unbiased for any m, so values from different
sample counts are comparable; it can be slightly negative when the distributions are equal. The defaults
(100 subsets of at most 1000) are those of the KID paper's code and clean-fid.
"""

from __future__ import annotations

import numpy as np

__all__ = ["kid", "polynomial_mmd2_unbiased"]


def _kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """MMD²_u of two equally large feature sets (m, d) under the cubic polynomial kernel (module docstring)."""
    m = len(x)
    if m < 2 or len(y) != m:
        raise ValueError(f"need two sets of the same size >= 2, got {len(x)} and {len(y)}")
    kxx, kyy, kxy = _kernel(x, x), _kernel(y, y), _kernel(x, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.mean())


def kid(fake: np.ndarray, real: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float, int]:
    """(mean, sd over subsets, m) of MMD²_u over ``subsets`` random subset pairs of m = min(subset_size,
    len(fake), len(real)) rows each; features in float64. Seeded: the same inputs give the same value."""
    fake, real = np.asarray(fake, dtype=np.float64), np.asarray(real, dtype=np.float64)
    if fake.ndim != 2 or real.ndim != 2 or fake.shape[1] != real.shape[1]:
        raise ValueError(f"need two (N, d) feature sets of one width, got {fake.shape} and {real.shape}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"need subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    m = min(subset_size, len(fake), len(real))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples and 2 real features, got {len(fake)} and {len(real)}")
    rng = np.random.default_rng(seed)
    values = np.array([polynomial_mmd2_unbiased(fake[rng.choice(len(fake), m, replace=False)],
                                                real[rng.choice(len(real), m, replace=False)])
                       for _ in range(subsets)])
    return float(values.mean()), float(values.std(ddof=1)) if subsets > 1 else 0.0, m
