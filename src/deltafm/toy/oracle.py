"""Closed-form flow-matching and ΔFM velocity fields for Gaussian classes (the "oracle").

When the source is N(μ0, s0² I), class k is N(μ_k, s_k² I), x0 and x1 are drawn independently and the
path is linear (x_t = t x1 + (1 − t) x0, u = x1 − x0), then (x_t, u) is jointly Gaussian given k and

    v_FM(x, t | k) = E[u | x_t = x, k] = (μ_k − μ0) + c_k(t) (x − m_k(t)),
    m_k(t) = t μ_k + (1 − t) μ0,   c_k(t) = (t s_k² − (1 − t) s0²) / (t² s_k² + (1 − t)² s0²).

Its ODE maps x0 to μ_k + (s_k / s0)(x0 − μ0) at t = 1 (an exact transport, used in the tests).
The ΔFM optimum follows from the affine map v_λ = (v_FM − λ ū) / (1 − λ), where for negatives
drawn uniformly from the other batch items ū = E[x1] − E[x0] = Σ_k π_k μ_k − μ0 exactly, and for
different-class negatives ū(k) is the same mean over the classes other than k (class-weighted).
"""

from __future__ import annotations

import torch
from torch import Tensor

from deltafm.correction import to_delta_optimum
from deltafm.toy.datasets import EightGaussians, PaperGaussians, ToyDataset

__all__ = ["GaussianOracle", "has_oracle"]


def has_oracle(dataset: ToyDataset) -> bool:
    """True when every class and the source are isotropic Gaussians (closed-form fields exist)."""
    return isinstance(dataset, (PaperGaussians, EightGaussians))


class GaussianOracle:
    """The exact v_FM (``lam = 0``) or ΔFM optimum v_λ as a model ``oracle(x, t, cond)``.

    The null class id (``num_classes``) gets the marginal field E[u | x_t] of the class mixture.
    """

    def __init__(self, dataset: ToyDataset, lam: float = 0.0, negatives: str = "uniform") -> None:
        if not has_oracle(dataset):
            raise ValueError(f"no closed-form field for {type(dataset).__name__}")
        if negatives not in ("uniform", "different_class"):
            raise ValueError("negatives must be 'uniform' or 'different_class'")
        self.dataset = dataset
        self.num_classes = dataset.num_classes
        self.lam = float(lam)
        self.negatives = negatives
        self.means = dataset.means.to(torch.float64)  # (K, 2)
        self.std = float(dataset.std)
        if isinstance(dataset, PaperGaussians):
            self.src_mean, self.src_std = dataset.source_mean.to(torch.float64), float(dataset.source_std)
        else:
            self.src_mean, self.src_std = torch.zeros(2, dtype=torch.float64), 1.0
        pi = dataset.class_probs
        self.u_bar_all = (pi[:, None] * self.means).sum(0) - self.src_mean  # Σ π_k μ_k − μ0
        other = []
        for k in range(self.num_classes):
            w = pi.clone()
            w[k] = 0.0
            other.append((w[:, None] * self.means).sum(0) / w.sum() - self.src_mean)
        self.u_bar_other = torch.stack(other)  # (K, 2)

    def _class_field(self, x: Tensor, t: Tensor, k: Tensor) -> Tensor:
        mu = self.means[k]
        s1, s0 = self.std**2, self.src_std**2
        tt = t[:, None]
        c = (tt * s1 - (1 - tt) * s0) / (tt**2 * s1 + (1 - tt) ** 2 * s0)
        m = tt * mu + (1 - tt) * self.src_mean
        return (mu - self.src_mean) + c * (x - m)

    def fm_velocity(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Exact E[u | x_t = x, class] (float64); null ids get the mixture's field."""
        x64, t64 = x.to(torch.float64), t.to(torch.float64)
        cond = cond.long()
        is_null = cond >= self.num_classes
        out = self._class_field(x64, t64, cond.clamp(max=self.num_classes - 1))
        if bool(is_null.any()):
            xn, tn = x64[is_null], t64[is_null]
            fields, logw = [], []
            for k in range(self.num_classes):
                kk = torch.full((xn.shape[0],), k, dtype=torch.long)
                fields.append(self._class_field(xn, tn, kk))
                mk = tn[:, None] * self.means[k] + (1 - tn[:, None]) * self.src_mean
                var = tn**2 * self.std**2 + (1 - tn) ** 2 * self.src_std**2
                logw.append(self.dataset.class_probs[k].log() - ((xn - mk) ** 2).sum(1) / (2 * var) - torch.log(var))
            w = torch.softmax(torch.stack(logw, 1), dim=1)  # posterior over classes at x_t
            out[is_null] = (w[:, :, None] * torch.stack(fields, 1)).sum(1)
        return out

    def u_bar(self, cond: Tensor) -> Tensor:
        """Mean negative target ū per sample (B, 2) for this oracle's negatives."""
        cond = cond.long()
        if self.negatives == "uniform":
            return self.u_bar_all.expand(cond.shape[0], 2)
        null = cond >= self.num_classes
        ub = self.u_bar_other[cond.clamp(max=self.num_classes - 1)]
        return torch.where(null[:, None], self.u_bar_all.expand_as(ub), ub)

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        v = self.fm_velocity(x, t, cond)
        if self.lam > 0:
            v = to_delta_optimum(v, self.u_bar(cond), self.lam)
        return v.to(x.dtype)
