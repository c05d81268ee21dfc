"""ΔFM in diffusers' flow-matching training scripts (SD3 ``SD3Transformer2DModel``, FLUX), in their conventions.

diffusers' scripts (``train_dreambooth[_lora]_sd3.py``, ``..._flux.py``) and deltafm name the same linear path
differently; every tensor maps to the other by a sign or by σ = 1 − t:

==================  ===============================================  ======================================
quantity            diffusers                                        deltafm
==================  ===============================================  ======================================
time                σ ∈ [0, 1], σ = 1 is noise                       t = 1 − σ, t = 0 is noise
noisy input         (1 − σ)·x + σ·ε                                  x_t = t·x + (1 − t)·ε  (the same tensor)
model's time input  ``timestep`` = σ·1000 (SD3; the FLUX scripts     t
                    pass σ, FLUX multiplies by 1000 inside)
target              ε − x  (= dx_σ/dσ)                               u = x − ε = −target
prediction          ``pred``                                         v = −pred
plain loss          mean_i mean_d w_i (pred_i − target_i)²           mean_i mean_d (v_i − u_i)²
==================  ===============================================  ======================================

The ΔFM loss (:func:`delta_fm_loss_diffusers`), with per-sample weights w_i from
``compute_loss_weighting_for_sd3`` (1 when None) and a negative j(i) ≠ i per anchor::

    loss = mean_i [ w_i mean_d (pred_i − target_i)² − λ w_i mean_d (pred_i − target_{j(i)})² ]

Since v − u = −(pred − target) and v_i − u_j = −(pred_i − target_j), both squared distances are the ones deltafm
computes, so with w ≡ 1 this is :func:`deltafm.losses.contrastive_loss_parts` on (v, u) — bit for bit: IEEE
rounding is symmetric under negation. With λ = 0 it is the scripts' MSE line, bit for bit (the same operations
in the same order). On the linear path the target ε_j − x_j does not depend on σ, so the negative built at the
anchor's σ_i (paper Eq. 6) and at the negative's own σ_j (reference code) coincide.

Minimised with negatives drawn independently of the anchor, the prediction tends to
pred_λ = (pred_FM − λ ū)/(1 − λ) with ū = E[target_j] = E[ε] − E[x] = −E[x] (E[ε] = 0); the sampling-time bias
correction inverts it: pred_FM = (1 − λ)·pred_λ + λ·ū (:func:`correct_prediction`, :func:`add_bias_correction`),
with E[x] estimated by :class:`RunningMean` over the latents trained on. This is deltafm's
v_FM = (1 − λ) v_λ + λ ū_deltafm, negated.

Preconditioned outputs (the SD3 scripts' ``--precondition_outputs 1``, their default): x̂ = x_t − σ·pred is
regressed on x. As x_t − σ·(ε − x) = x, (x̂ − x) = −σ·(pred − target): that loss is the velocity loss with
weights w·σ². Use the raw ``pred`` (before the preconditioning line), ``target = noise − model_input`` and
``weighting = weighting * sigmas**2``; the negative term then contrasts x̂ with x_t − σ·target_j.

This module needs only torch; diffusers is never imported.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..losses import check_lambda
from ..negatives import NEGATIVE_KINDS, NegativeSampler

__all__ = [
    "DiffusersLossOutput",
    "RunningMean",
    "add_bias_correction",
    "correct_prediction",
    "delta_fm_loss_diffusers",
    "deltafm_to_diffusers",
    "diffusers_to_deltafm",
    "sigma_to_t",
    "sigma_to_timestep",
    "t_to_sigma",
    "timestep_to_sigma",
    "u_bar_diffusers",
]


# -- conventions ----------------------------------------------------------------------------------------
def sigma_to_t(sigma: Tensor) -> Tensor:
    """deltafm time from diffusers' noise level: t = 1 − σ (any shape).

    In float32, t_to_sigma(sigma_to_t(σ)) == σ exactly for σ ∈ [½, 1] and for multiples of 2⁻²⁴ (1 − σ is then
    exact, Sterbenz); otherwise 1 − σ is rounded and the round trip is off by at most 2⁻²⁵.
    """
    return 1 - sigma


def t_to_sigma(t: Tensor) -> Tensor:
    """diffusers' noise level from deltafm time: σ = 1 − t (any shape; see :func:`sigma_to_t` on rounding)."""
    return 1 - t


def sigma_to_timestep(sigma: Tensor, num_train_timesteps: int = 1000) -> Tensor:
    """The ``timestep`` an SD3 transformer is called with: σ·N (N = the scheduler's ``num_train_timesteps``),
    shape (B,). ``FlowMatchEulerDiscreteScheduler`` builds its ``timesteps`` as exactly ``sigmas * N``."""
    return sigma.reshape(sigma.shape[0]) * num_train_timesteps


def timestep_to_sigma(timestep: Tensor, num_train_timesteps: int = 1000) -> Tensor:
    """σ = timestep / N, shape (B,) (the inverse of :func:`sigma_to_timestep`, up to rounding)."""
    return timestep.reshape(timestep.shape[0]) / num_train_timesteps


def diffusers_to_deltafm(pred: Tensor, target: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(pred, target = ε − x, σ) → (v, u, t) = (−pred, −target, 1 − σ), with t of shape (B,).

    ``sigma`` may have diffusers' shape (B, 1, ..., 1) or (B,). The noisy input needs no conversion:
    (1 − σ)·x + σ·ε = t·x + (1 − t)·ε.
    """
    _check_same_shape(pred, target, "pred", "target")
    b = pred.shape[0]
    if sigma.numel() != b or sigma.shape[0] != b:
        raise ValueError(f"sigma must have shape (B,) or (B, 1, ..., 1) with B = {b}, got {tuple(sigma.shape)}")
    return -pred, -target, sigma_to_t(sigma.reshape(b))


def deltafm_to_diffusers(v: Tensor, u: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(v, u = x − ε, t) → (pred, target, σ) = (−v, −u, 1 − t), σ shaped (B, 1, ..., 1) like diffusers'
    ``get_sigmas`` so that it broadcasts against the latents."""
    _check_same_shape(v, u, "v", "u")
    b = v.shape[0]
    if t.shape != (b,):
        raise ValueError(f"t must have shape (B,) = ({b},), got {tuple(t.shape)}")
    return -v, -u, t_to_sigma(t).reshape(b, *([1] * (v.dim() - 1)))


# -- the loss -----------------------------------------------------------------------------------------------
class DiffusersLossOutput(NamedTuple):
    """``loss`` (scalar, with grad) = positive − λ·negative; ``positive`` = mean_i w_i mean_d (pred_i −
    target_i)² (the scripts' plain loss) and ``negative`` = mean_i w_i mean_d (pred_i − target_j(i))², both
    detached for logging; ``neg_index`` the j(i) used ((B,), None without negatives)."""

    loss: Tensor
    positive: Tensor
    negative: Tensor
    neg_index: Tensor | None


def _check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() < 1 or a.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch of shape (B, ...), got {tuple(a.shape)}")


def _weights(weighting: Tensor | None, pred: Tensor) -> Tensor | None:
    """``weighting`` as float32, broadcastable to ``pred``: (B,) is reshaped to (B, 1, ..., 1); diffusers'
    (B, 1, 1, 1) and any shape (B, ...) that broadcasts to ``pred`` without growing it are taken as they are."""
    if weighting is None:
        return None
    if not isinstance(weighting, Tensor):
        raise TypeError(f"weighting must be a tensor of shape (B,) or (B, 1, ..., 1), got {type(weighting).__name__}")
    b = pred.shape[0]
    if weighting.shape == (b,):
        weighting = weighting.reshape(b, *([1] * (pred.dim() - 1)))
    ok = weighting.dim() == pred.dim() and weighting.shape[0] == b
    if ok:
        try:
            ok = torch.broadcast_shapes(weighting.shape, pred.shape) == pred.shape
        except RuntimeError:
            ok = False
    if not ok:
        raise ValueError(
            f"weighting must have shape (B,) = ({b},) or (B, 1, ..., 1) (diffusers' compute_loss_weighting_for_sd3) "
            f"for pred of shape {tuple(pred.shape)}, got {tuple(weighting.shape)}"
        )
    return weighting.float()


def _weighted_mse(a: Tensor, b: Tensor, w: Tensor | None) -> Tensor:
    """mean_d w ⊙ (a − b)² per sample, (B,): the operations of diffusers' loss line, in its order."""
    sq = (a - b) ** 2
    if w is not None:
        sq = w * sq
    return sq.reshape(a.shape[0], -1).mean(1)


def _explicit_negatives(neg_index: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    b = target.shape[0]
    if not isinstance(neg_index, Tensor) or neg_index.dtype not in (torch.int64, torch.int32):
        raise TypeError("neg_index must be an integer tensor (LongTensor) of shape (B,)")
    if neg_index.shape != (b,):
        raise ValueError(f"neg_index must have shape (B,) = ({b},), got {tuple(neg_index.shape)}")
    lo, hi = int(neg_index.min()), int(neg_index.max())  # a host sync: only for indices the caller passes
    if lo < 0 or hi >= b:
        raise ValueError(f"neg_index out of range: values must lie in [0, {b - 1}], got min {lo}, max {hi}")
    idx = neg_index.to(device=target.device, dtype=torch.long)
    return idx, target.index_select(0, idx)


def _drawn_negatives(
    target: Tensor, negatives: str, labels: Tensor | None, generator: torch.Generator | None, gather: bool
) -> tuple[Tensor, Tensor]:
    """j(i) from deltafm's :class:`~deltafm.negatives.NegativeSampler` — the same pool and the same draws as
    :class:`~deltafm.objective.DeltaFMObjective` on the linear path — and the aligned targets target_j(i)."""
    b = target.shape[0]
    sampler = NegativeSampler(negatives, gather=gather)
    if sampler.needs_labels and labels is None:
        raise ValueError(f"{negatives} negatives need labels of shape (B,) = ({b},)")
    if labels is not None and labels.shape != (b,):
        raise ValueError(f"labels must have shape (B,) = ({b},), got {tuple(labels.shape)}")
    pool = sampler.pool({"u": target}, labels)
    idx = sampler.indices(pool, labels, generator, targets=target, batch_size=b)
    return idx, pool.tensors["u"].index_select(0, idx)


def delta_fm_loss_diffusers(
    pred: Tensor,
    target: Tensor,
    *,
    lam: float,
    weighting: Tensor | None = None,
    neg_index: Tensor | None = None,
    negatives: str = "uniform",
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
    gather: bool = False,
) -> DiffusersLossOutput:
    """The ΔFM loss in diffusers' terms, in place of the scripts' MSE line::

        loss = mean_i [ w_i mean_d (pred_i − target_i)² − λ w_i mean_d (pred_i − target_{j(i)})² ]

    computed in float32 like the scripts (``pred.float()``, ``target.float()``, ``weighting.float()``).

    Args:
        pred: the transformer's output (B, ...) — the raw velocity, before any preconditioning line.
        target: ``noise - model_input`` (B, ...), the same shape.
        lam: λ ∈ [0, 1) (checked by :func:`deltafm.losses.check_lambda`); λ = 0 is the scripts' loss exactly.
        weighting: w from ``compute_loss_weighting_for_sd3``, shape (B, 1, ..., 1) or (B,); None = 1.
        neg_index: explicit j(i) (B,) into this batch; overrides ``negatives``.
        negatives: ``uniform`` (j ≠ i uniform, independently per anchor: the reference rule), ``derangement``,
            ``different_class`` (needs ``labels``), ``hard``, or ``none`` (plain weighted MSE) — deltafm's
            samplers, with the same draws from ``generator`` as :class:`~deltafm.objective.DeltaFMObjective`.
        labels: class ids (B,) for ``different_class``.
        generator: the ``torch.Generator`` the negatives are drawn with.
        gather: draw negatives from the batch gathered across DDP ranks (a larger pool).
    """
    lam = check_lambda(lam)
    _check_same_shape(pred, target, "pred", "target")
    if negatives != "none" and negatives not in NEGATIVE_KINDS:
        raise ValueError(f"unknown negatives {negatives!r}; known: {['none', *NEGATIVE_KINDS]}")
    w = _weights(weighting, pred)
    pred32, target32 = pred.float(), target.float()
    if neg_index is not None:
        j, negative_target = _explicit_negatives(neg_index, target32)
    elif negatives == "none":
        j, negative_target = None, None
    else:
        j, negative_target = _drawn_negatives(target32, negatives, labels, generator, gather)
    positive = _weighted_mse(pred32, target32, w)
    if negative_target is None:
        negative, per_sample = torch.zeros_like(positive), positive
    else:
        negative = _weighted_mse(pred32, negative_target, w)
        per_sample = positive - lam * negative
    return DiffusersLossOutput(per_sample.mean(), positive.detach().mean(), negative.detach().mean(), j)


# -- the sampling-time correction -----------------------------------------------------------------------------
class RunningMean:
    """Exact running mean E[x] of the latents trained on (float64 sums), for ū = −E[x].

    ``reduce_dims`` (non-batch dims, default none) are averaged over as well: ``(2, 3)`` keeps one value per
    channel of (B, C, H, W) latents, so that ū fits any resolution (multi-resolution / bucketed training;
    exact when the data mean is constant over positions); ``(1,)`` does the same for FLUX's packed (B, N, 64)
    tokens. ``mean`` has shape (1, ...) with size 1 in the reduced dims, so it broadcasts against a batch.
    """

    def __init__(self, reduce_dims: tuple[int, ...] = ()) -> None:
        if any(d < 1 for d in reduce_dims):
            raise ValueError(f"reduce_dims must be non-batch dims (>= 1), got {reduce_dims}")
        self.reduce_dims = tuple(sorted(set(reduce_dims)))
        self.total: Tensor | None = None  # (1, ...) float64
        self.count = 0

    @property
    def initialized(self) -> bool:
        return self.total is not None and self.count > 0

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add a batch (B, ...) of latents."""
        if self.reduce_dims and max(self.reduce_dims) >= x.dim():
            raise ValueError(f"reduce_dims {self.reduce_dims} do not fit latents of shape {tuple(x.shape)}")
        dims = (0, *self.reduce_dims)
        part = x.detach().to(torch.float64).sum(dim=dims, keepdim=True)
        if self.total is not None and part.shape != self.total.shape:
            raise ValueError(
                f"RunningMean holds latents of reduced shape {tuple(self.total.shape[1:])}, got {tuple(part.shape[1:])}"
                " (latents of another resolution: use reduce_dims to keep per-channel means)"
            )
        self.total = part if self.total is None else self.total + part.to(self.total.device)
        self.count += math.prod(x.shape[d] for d in dims)

    @property
    def mean(self) -> Tensor:
        """E[x], float64, shape (1, ...)."""
        if not self.initialized:
            raise RuntimeError("RunningMean has no data yet: update it with the training latents")
        assert self.total is not None
        return self.total / self.count

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (safetensors-friendly)."""
        if self.total is None:
            return {}
        return {"total": self.total.detach().cpu().clone(), "count": torch.tensor(self.count, dtype=torch.int64),
                "reduce_dims": torch.tensor(self.reduce_dims, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if not state:
            self.total, self.count = None, 0
            return
        dims = tuple(int(d) for d in state["reduce_dims"].tolist())
        if dims != self.reduce_dims:
            raise ValueError(f"the state's mean is reduced over {dims}, this RunningMean's over {self.reduce_dims}")
        self.total = state["total"].to(torch.float64).clone()
        self.count = int(state["count"])


def u_bar_diffusers(data_mean: RunningMean | Tensor, noise_mean: Tensor | None = None) -> Tensor:
    """The mean negative target in diffusers' terms: ū = E[ε_j − x_j] = E[ε] − E[x].

    ``noise_mean`` defaults to 0, the exact E[ε] of standard Gaussian noise (better than an empirical
    estimate). This is −ū_deltafm (deltafm's ū = E[x] − E[ε]). Valid for negatives drawn independently of the
    anchor over all items (``uniform``, ``derangement``); with ``different_class`` ū is the mean of the *other*
    classes and depends on the label.
    """
    m = data_mean.mean if isinstance(data_mean, RunningMean) else data_mean
    return -m if noise_mean is None else noise_mean.to(m) - m


def correct_prediction(pred: Tensor, lam: float, u_bar: Tensor) -> Tensor:
    """ΔFM prediction → flow-matching prediction, in diffusers' terms: pred_FM = (1 − λ)·pred + λ·ū.

    Inverts the ΔFM optimum pred_λ = (pred_FM − λ ū)/(1 − λ). Exactly −:func:`deltafm.correction.bias_correct`
    (−pred, −ū, λ). Affine with weights summing to one and the same ū for every row, so it commutes with
    classifier-free guidance (u + w(c − u) of corrected rows = the corrected guided prediction).
    ``u_bar`` (from :func:`u_bar_diffusers`) is cast to ``pred``'s dtype and device and must broadcast to it.
    """
    lam = check_lambda(lam)
    return (1.0 - lam) * pred + lam * u_bar.to(device=pred.device, dtype=pred.dtype)


def add_bias_correction(transformer: nn.Module, lam: float, u_bar: Tensor) -> RemovableHandle:
    """Correct every output of ``transformer`` with :func:`correct_prediction` (a forward hook).

    The hooked transformer stays a drop-in part of its pipeline (``pipe.transformer``): the pipeline's Euler
    steps and CFG then run on the flow-matching prediction. Handles the ``return_dict=False`` tuple, diffusers'
    ``Transformer2DModelOutput`` and a bare tensor. ``handle.remove()`` undoes it.
    """
    lam = check_lambda(lam)
    u_bar = u_bar.detach()

    def hook(module: nn.Module, args: tuple, output: object) -> object:
        if isinstance(output, Tensor):
            return correct_prediction(output, lam, u_bar)
        if isinstance(output, tuple):
            return (correct_prediction(output[0], lam, u_bar), *output[1:])
        if dataclasses.is_dataclass(output) and hasattr(output, "sample"):
            return dataclasses.replace(output, sample=correct_prediction(output.sample, lam, u_bar))
        raise TypeError(f"cannot correct a transformer output of type {type(output).__name__}")

    return transformer.register_forward_hook(hook)
