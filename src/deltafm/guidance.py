"""Sampling-time velocity: classifier-free guidance, with an optional ΔFM ↔ FM map per branch.

**CFG.**  v = v_u + w (v_c − v_u) with the unconditional branch using the null class; w = 1 is
off.  Guidance applies only where t lies in ``interval = (t_lo, t_hi)`` (inclusive); elsewhere
the conditional velocity is used.  A :class:`~deltafm.correction.BiasCorrection` is applied to
each branch with its own ū before combining (for uniform negatives ū does not depend on y, and the
two orders agree).

**Texts and several conditions** (:mod:`deltafm.conditioning`): with a :class:`TextCond` or a
:class:`MultiCond` the unconditional branch nulls the text / every part (joint CFG, one scale w). With a
weight per part, ``scale={"shape": w_1, "colour": w_2, ...}`` (compositional CFG), the leave-one-out form

    v = v(c) + Σ_k (w_k − 1) (v(c) − v(c without k))

runs one branch per part with w_k ≠ 1 plus the full condition, as one batch; parts not named keep
w = 1. For a single part it is ordinary CFG, v(∅) + w (v(c) − v(∅)).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from .conditioning import Cond, MultiCond, cat_conds, null_condition, without
from .correction import BiasCorrection

__all__ = ["GuidedVelocity", "cfg_combine"]


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: v_u + w (v_c − v_u); w = 1 returns v_c."""
    return v_uncond + scale * (v_cond - v_uncond)


class GuidedVelocity:
    """A velocity field ``v(x, t)`` for the solvers, built from a model ``model(x, t, cond)``.

    Args:
        model: the network; called with ``t`` of shape (B,).
        cond: class ids (B,), a TextCond or a MultiCond (or None for an unconditional model).
        scale: CFG scale w (1 = off), or one weight per part of a MultiCond (compositional CFG).
        interval: (t_lo, t_hi): guidance applies where t_lo <= t <= t_hi.
        null_class: the id of the unconditional class (needed when scale != 1).
        correction: optional :class:`BiasCorrection` applied to every branch.
        amp_dtype: run the model under CPU/CUDA autocast with this dtype.

    Counts ``calls`` (velocity evaluations, the solver's NFE) and ``forward_passes`` (model
    evaluations per sample batch: a guided step costs two, run as one doubled batch).
    """

    def __init__(
        self,
        model: nn.Module | Callable[[Tensor, Tensor, Cond | None], Tensor],
        cond: Cond | None = None,
        scale: float | Mapping[str, float] = 1.0,
        interval: tuple[float, float] = (0.0, 1.0),
        null_class: int | None = None,
        correction: BiasCorrection | None = None,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        self.weights: dict[str, float] | None = None
        if isinstance(scale, Mapping):
            if not isinstance(cond, MultiCond):
                raise ValueError("a guidance weight per condition needs a multi-condition (MultiCond) cond")
            unknown = sorted(set(scale) - set(cond.names))
            if unknown:
                raise ValueError(f"guidance weights for unknown condition(s) {unknown}; the model is conditioned "
                                 f"on {list(cond.names)}")
            self.weights = {k: float(w) for k, w in scale.items() if float(w) != 1.0} or None
            scale = 1.0
        elif scale != 1.0 and (cond is None or (isinstance(cond, Tensor) and null_class is None)):
            raise ValueError("classifier-free guidance (scale != 1) needs cond and the null_class id")
        lo, hi = interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"guidance interval must satisfy 0 <= lo <= hi <= 1, got {interval}")
        self.model, self.cond, self.scale = model, cond, float(scale)
        self.interval = (float(lo), float(hi))
        self.null_class, self.correction, self.amp_dtype = null_class, correction, amp_dtype
        self.calls = 0
        self.forward_passes = 0

    def _model(self, x: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        self.forward_passes += 1
        if self.amp_dtype is not None:
            with torch.autocast(device_type=x.device.type, dtype=self.amp_dtype):
                out = self.model(x, t, cond)
        else:
            out = self.model(x, t, cond)
        out = out.to(x.dtype)
        if self.correction is not None:
            out = self.correction(out, t, cond)
        return out

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        lo, hi = self.interval
        inside = (t >= lo) & (t <= hi)
        if (self.scale == 1.0 and self.weights is None) or not bool(inside.any()):
            return self._model(x, t, self.cond)
        assert self.cond is not None
        if self.weights is not None:
            guided, v_c = self._compositional(x, t)
        else:  # joint CFG: the null class id, or every text / part nulled
            null = null_condition(self.cond, self.null_class)
            both = self._model(torch.cat([x, x]), torch.cat([t, t]), cat_conds([self.cond, null]))
            self.forward_passes += 1  # the doubled batch costs two passes
            v_c, v_u = both.chunk(2)
            guided = cfg_combine(v_c, v_u, self.scale)
        return torch.where(inside.reshape(-1, *([1] * (x.dim() - 1))), guided, v_c)

    def _compositional(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(guided, v(c)): v(c) + Σ_k (w_k − 1)(v(c) − v(c without k)), all branches as one batch."""
        assert isinstance(self.cond, MultiCond) and self.weights is not None
        names = list(self.weights)
        conds = [self.cond, *(without(self.cond, k) for k in names)]
        n = len(conds)
        out = self._model(torch.cat([x] * n), torch.cat([t] * n), cat_conds(conds))
        self.forward_passes += n - 1
        branches = out.chunk(n)
        v_c = branches[0]
        guided = v_c
        for k, v_k in zip(names, branches[1:]):
            guided = guided + (self.weights[k] - 1.0) * (v_c - v_k)
        return guided, v_c
