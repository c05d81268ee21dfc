"""Flow-matching and contrastive flow-matching (ΔFM) losses as pure functions.

For a batch of predicted velocities ``pred`` = v_θ(x_t, t, y) and targets ``target`` = u
(shape (B, ...), D elements per sample) and a negative index j(i) per anchor i::

    positive_i = (1/D) ‖pred_i − u_i‖²
    negative_i = (1/D) ‖pred_i − u_{j(i)}‖²
    loss_i     = positive_i − λ · negative_i                           (ΔFM, Stoica et al. 2025)

λ = 0 is plain flow matching.  The per-sample loss is convex in pred only while λ < 1
(its Hessian is 2(1 − λ)/D · I), so λ ∈ [0, 1) is enforced.  Its gradient is
``∂loss_i/∂pred_i = 2/D · [(1 − λ) pred_i − u_i + λ u_{j(i)}]``, which vanishes at
pred = (u_i − λ u_j)/(1 − λ): in expectation, (v_FM − λ ū)/(1 − λ).

Two forms: :func:`contrastive_loss_parts` takes the negative targets already aligned with the
anchors (``negative_target[i]`` = u_{j(i)}) and reads no tensor values, so it never synchronises a
GPU with the host (the training objective uses it); :func:`contrastive_flow_matching_parts` /
:func:`contrastive_flow_matching_loss` take an index j and a pool, validate them (range, finiteness:
host synchronisations) and gather ``pool[j]`` before calling the aligned form.

The reduction is the mean over the non-batch dimensions, then ``mean`` / ``sum`` over the
batch, or ``none`` for the (B,) vector — the same as the reference code.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "LossParts",
    "check_lambda",
    "flow_matching_loss",
    "contrastive_loss_parts",
    "contrastive_flow_matching_loss",
    "contrastive_flow_matching_parts",
]

_REDUCTIONS = ("mean", "sum", "none")


class LossParts(NamedTuple):
    """Per-sample pieces of the ΔFM loss, each of shape (B,): loss = positive − λ·negative."""

    loss: Tensor
    positive: Tensor
    negative: Tensor


def check_lambda(lam: float) -> float:
    """Validate the contrastive weight: 0 <= λ < 1 (λ >= 1 makes the loss unbounded below)."""
    lam_f = float(lam)
    if lam_f != lam_f or not 0.0 <= lam_f < 1.0:
        raise ValueError(
            f"lam must satisfy 0 <= lam < 1, got {lam}: for lam >= 1 the ΔFM loss is unbounded below "
            "(pred can move away from both targets forever); lam = 0 is plain flow matching"
        )
    return lam_f


def _check_pair(pred: Tensor, target: Tensor, check_finite: bool) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.dim() < 1 or pred.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch of shape (B, ...), got {tuple(pred.shape)}")
    if check_finite:
        for name, x in (("pred", pred), ("target", target)):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name} contains NaN or Inf")


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _per_sample_mse(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).pow(2).flatten(1).mean(dim=1)


def flow_matching_loss(pred: Tensor, target: Tensor, reduction: str = "mean", check_finite: bool = True) -> Tensor:
    """Plain flow-matching loss: per sample (1/D) ‖pred − target‖², then reduced over the batch."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    _check_pair(pred, target, check_finite)
    return _reduce(_per_sample_mse(pred, target), reduction)


def contrastive_loss_parts(pred: Tensor, target: Tensor, negative_target: Tensor, lam: float = 0.05) -> LossParts:
    """Per-sample ΔFM loss from aligned negatives: ``negative_target[i]`` is anchor i's ũ.

    positive_i = (1/D)‖pred_i − u_i‖², negative_i = (1/D)‖pred_i − ũ_i‖², loss_i = positive_i − λ negative_i.
    Checks shapes and λ only (nothing that reads tensor values), so it is safe in a hot loop.
    """
    lam = check_lambda(lam)
    if pred.shape != target.shape or negative_target.shape != target.shape:
        raise ValueError(
            f"pred, target and negative_target must have the same shape, got {tuple(pred.shape)}, "
            f"{tuple(target.shape)} and {tuple(negative_target.shape)}"
        )
    positive = _per_sample_mse(pred, target)
    negative = _per_sample_mse(pred, negative_target)
    return LossParts(loss=positive - lam * negative, positive=positive, negative=negative)


def contrastive_flow_matching_parts(
    pred: Tensor,
    target: Tensor,
    neg_index: Tensor,
    lam: float = 0.05,
    negatives: Tensor | None = None,
    check_finite: bool = True,
) -> LossParts:
    """Per-sample ΔFM loss and its positive / negative distances (for logging).

    Args:
        pred: predicted velocities (B, ...).
        target: target velocities u (B, ...).
        neg_index: LongTensor (B,), the index of each anchor's negative in ``negatives``.
        lam: contrastive weight λ ∈ [0, 1).
        negatives: the pool of negative targets (M, ...); defaults to ``target`` itself.  Pass the
            targets gathered from all ranks to contrast against a larger pool.
        check_finite: raise on NaN/Inf inputs (one host sync per tensor; switch off in hot loops
            that already check the loss).
    """
    lam = check_lambda(lam)
    _check_pair(pred, target, check_finite)
    pool = target if negatives is None else negatives
    if negatives is not None:
        if negatives.shape[1:] != target.shape[1:]:
            raise ValueError(
                f"negatives must have per-sample shape {tuple(target.shape[1:])}, got {tuple(negatives.shape[1:])}"
            )
        if check_finite and not bool(torch.isfinite(negatives).all()):
            raise ValueError("negatives contains NaN or Inf")
    b, m = pred.shape[0], pool.shape[0]
    if m < 2:
        raise ValueError(
            "the contrastive loss needs at least 2 samples in the batch (each anchor needs another sample "
            f"as its negative), got a pool of {m}"
        )
    if not isinstance(neg_index, Tensor) or neg_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"neg_index must be an integer tensor (LongTensor), got {type(neg_index).__name__}"
            + (f" of dtype {neg_index.dtype}" if isinstance(neg_index, Tensor) else "")
        )
    if neg_index.shape != (b,):
        raise ValueError(f"neg_index must have shape (B,) = ({b},), got {tuple(neg_index.shape)}")
    lo, hi = int(neg_index.min()), int(neg_index.max())
    if lo < 0 or hi >= m:
        raise ValueError(f"neg_index out of range: values must lie in [0, {m - 1}], got min {lo}, max {hi}")
    negative_target = pool.index_select(0, neg_index.to(device=pool.device, dtype=torch.long))
    return contrastive_loss_parts(pred, target, negative_target, lam)


def contrastive_flow_matching_loss(
    pred: Tensor,
    target: Tensor,
    neg_index: Tensor,
    lam: float = 0.05,
    reduction: str = "mean",
    negatives: Tensor | None = None,
    check_finite: bool = True,
) -> Tensor:
    """ΔFM loss: per sample (1/D)‖pred − u_i‖² − λ (1/D)‖pred − u_{j(i)}‖², reduced over the batch.

    Drop-in replacement for an MSE flow-matching loss::

        j = deltafm.negatives.uniform_negatives(len(x), generator=g, device=x.device)
        loss = deltafm.contrastive_flow_matching_loss(model(x_t, t, y), u, j, lam=0.05)

    See :func:`contrastive_flow_matching_parts` for the arguments.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    parts = contrastive_flow_matching_parts(pred, target, neg_index, lam, negatives, check_finite)
    return _reduce(parts.loss, reduction)
