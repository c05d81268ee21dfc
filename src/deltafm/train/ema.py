"""Exponential moving average (EMA) of model weights, by per-step decay or by half-life in images.

After each optimizer step, every floating-point parameter and buffer θ̄ of the EMA copy moves toward the
live weights θ:

    θ̄ ← β θ̄ + (1 − β) θ

with either a fixed per-step decay β = ``decay`` (the paper: 0.9999), or a half-life h counted in images
(EDM-style): after h images the old average keeps half its weight, so a step of b images uses
β = 0.5 ** (b / h). With ``rampup`` r the half-life is capped at r · images_seen, so that short runs are
not dominated by the random initialisation. Non-float buffers (counters) are copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA", "ema_beta"]


def ema_beta(
    batch_images: int,
    images_seen: int,
    decay: float | None = None,
    halflife_images: float | None = None,
    rampup: float | None = None,
) -> float:
    """The per-step decay β for a step of ``batch_images`` images ending at ``images_seen`` images."""
    if (decay is None) == (halflife_images is None):
        raise ValueError("give exactly one of decay and halflife_images")
    if decay is not None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        return float(decay)
    assert halflife_images is not None
    h = float(halflife_images)
    if rampup is not None:
        h = min(h, rampup * images_seen)
    if h <= 0:
        return 0.0
    return 0.5 ** (batch_images / h)


class EMA:
    """An EMA copy of ``model`` (an ``nn.Module`` in eval mode without gradients: ``ema.module``).

    Args:
        model: the live model (pass the raw module, not a DDP or compiled wrapper).
        decay: per-step decay β (exclusive with ``halflife_images``).
        halflife_images: half-life in images.
        rampup: cap the half-life at ``rampup * images_seen`` (half-life mode only).
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float | None = 0.9999,
        halflife_images: float | None = None,
        rampup: float | None = None,
    ) -> None:
        ema_beta(1, 1, decay, halflife_images, rampup)  # validate
        self.decay, self.halflife_images, self.rampup = decay, halflife_images, rampup
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.last_beta: float | None = None

    def beta(self, batch_images: int, images_seen: int) -> float:
        return ema_beta(batch_images, images_seen, self.decay, self.halflife_images, self.rampup)

    @torch.no_grad()
    def update(self, model: nn.Module, batch_images: int, images_seen: int) -> float:
        """Move the average toward ``model`` after a step of ``batch_images`` (now ``images_seen``).
        Returns the β used."""
        beta = self.beta(batch_images, images_seen)
        self.apply(model, beta)
        return beta

    @torch.no_grad()
    def apply(self, model: nn.Module, beta: float, done: frozenset[int] = frozenset()) -> None:
        """θ̄ ← θ̄ + (1 − β)(θ − θ̄) for every floating parameter and buffer of ``model`` (non-float buffers
        copied), except the EMA parameters whose ``id`` is in ``done``: those a caller has already moved
        (:class:`deltafm.train.fused_update.FusedUpdate` does it inside its kernel)."""
        ema_p = [p for p in self.module.parameters()]
        live_p = [p.detach() for p in model.parameters()]
        if len(ema_p) != len(live_p):
            raise ValueError("EMA and model have different parameter lists")
        floats = [(e, v) for e, v in zip(ema_p, live_p) if e.dtype.is_floating_point and id(e) not in done]
        if floats:
            e_list = [e for e, _ in floats]
            v_list = [v.to(e.dtype) for e, v in floats]
            torch._foreach_lerp_(e_list, v_list, 1.0 - beta)
        for eb, vb in zip(self.module.buffers(), model.buffers()):
            if eb.dtype.is_floating_point:
                eb.lerp_(vb.to(eb.dtype), 1.0 - beta)
            else:
                eb.copy_(vb)
        self.last_beta = beta

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

    def to(self, device: torch.device | str) -> EMA:
        self.module.to(device)
        return self
