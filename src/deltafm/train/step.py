"""One optimizer step, with one device -> host synchronisation.

For a global batch of B images split over W ranks and A accumulation micro-steps, :func:`train_step`
does on each rank::

    lr = optim.lr · min(1, images / warmup_images)
    for each micro-batch (B / (W·A) images):
        with autocast(precision):  out = DeltaFMObjective(model, x, y, generator=g_rank, progress=images)
        (out.loss / A).backward()                  # DDP all-reduces gradients on the last micro-step only
    ‖g‖ = clip_grad_norm_(params, grad_clip)       # unscaled first under fp16
    r = [loss, positive, negative, repa, non-finite, stop]  summed over ranks (all-reduce, on the device)
    (bf16-compute: the bf16 copy's gradients are cast into the fp32 master's first; train.bf16_compute)
    r, ‖g‖ -> host with ONE .tolist()             # the step's only device -> host synchronisation
    non-finite on any rank -> NonFiniteLossError  (before the optimizer step: the last checkpoint stays good)
    AdamW step (bf16-compute: then copy <- bf16(master));  EMA update;  step += 1;  images += B
    (optim.fused_update: ‖g‖ from the gradients as they are; clipping, AdamW, the copy and the EMA in one
    compiled kernel per parameter tensor: deltafm.train.fused_update)

The per-step reduction is the only point where the host waits for the device: everything before it
(random draws, negatives, loss, clipping) and after it (the AdamW step, fused by default, the EMA) is
queued without reading a tensor's value. The loop runs the step inside
:func:`deltafm.checks.validation_disabled` (its labels were checked once when the data was loaded), so
the class-id range checks of the objective, the class embedding and the mean target, which read
values, are skipped. ``tests/test_sync.py`` counts the operations that would synchronise on a GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from deltafm.errors import UserError

from .distributed import all_reduce_sum

if TYPE_CHECKING:
    from .config import Config
    from .setup import Run

__all__ = ["NonFiniteLossError", "StepStats", "learning_rate", "train_step"]

_PARTS = ("loss", "positive", "negative", "repa")


class NonFiniteLossError(UserError, RuntimeError):
    """The loss (or gradient norm) became NaN/Inf; the run stopped before the optimizer step."""


@dataclass(frozen=True)
class StepStats:
    """What one step reports, read from the device in the step's one synchronisation."""

    loss: float  # mean over ranks
    positive: float
    negative: float
    repa: float  # the REPA term (0 when REPA is off)
    grad_norm: float  # this rank's (the same on every rank: gradients are all-reduced)
    lr: float
    stop: bool  # some rank was asked to stop (SIGTERM / SIGINT)


def learning_rate(cfg: Config, images: int) -> float:
    """lr of the step that starts at ``images`` images seen (linear warm-up)."""
    o, batch = cfg.optim, cfg.train.batch_size
    return o.lr * (min(1.0, (images + batch) / o.warmup_images) if o.warmup_images > 0 else 1.0)


def train_step(run: Run, x: Tensor, y: Tensor, stop_requested: bool = False,
               extras: dict[str, Tensor] | None = None) -> StepStats:
    """One optimizer step on this rank's share (x, y) of a global batch; see the module docstring.
    ``extras``: per-item tensors read with the batch (REPA's precomputed tokens or stored images).

    Advances ``run.step`` and ``run.images``. Raises :class:`NonFiniteLossError` (on every rank) when
    any rank saw a non-finite loss (or gradient norm, outside fp16), before the optimizer step."""
    lr = learning_rate(run.cfg, run.images)
    for g in run.opt.param_groups:
        g["lr"] = lr
    sums = _forward_backward(run, x, y, extras or {})
    if run.fused is not None:  # optim.fused_update: the norm now, clipping inside the update's kernels
        gnorm = run.fused.grad_norm()
    else:
        if run.compute is not None:  # bf16-compute: the copy's gradients -> the fp32 master's .grad
            run.compute.grads_to_master()
        run.scaler.unscale_(run.opt)
        gnorm = torch.nn.utils.clip_grad_norm_(run.params, run.clip)
    loss, positive, negative, repa, nonfinite, stop, grad_norm = _reduce(run, sums, gnorm, stop_requested)
    if nonfinite > 0:
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {run.step + 1} (images {run.images}): "
            f"loss={loss / run.di.world_size}, grad_norm={grad_norm} on rank {run.di.rank}; the optimizer step "
            f"was not taken. Last good checkpoint: {run.last_checkpoint or 'none yet'}. Try a lower optim.lr, "
            "train.precision=fp32, or optim.grad_clip."
        )
    batch = run.cfg.train.batch_size
    if run.fused is not None:  # clip, AdamW, copy <- bf16(master) and the EMA in one pass (.fused_update)
        beta = run.ema.beta(batch, run.images + batch) if run.ema is not None else None
        run.fused.step(gnorm, run.clip, beta)
    else:
        run.scaler.step(run.opt)
        run.scaler.update()
        run.opt.zero_grad(set_to_none=True)
        if run.compute is not None:
            run.compute.refresh()  # compute copy <- bf16(master)
        if run.ema is not None:
            run.ema.update(run.raw, batch, run.images + batch)
    run.step += 1
    run.images += batch
    w = run.di.world_size
    return StepStats(loss / w, positive / w, negative / w, repa / w, grad_norm, lr, stop > 0)


def _forward_backward(run: Run, x: Tensor, y: Tensor, extras: dict[str, Tensor]) -> Tensor:
    """Forward and backward over the micro-batches; returns [loss, positive, negative, repa] (float64, on
    the device) averaged over them. With REPA the targets of each micro-batch are made first (no grad)."""
    accum, m, device = run.cfg.train.grad_accum, run.micro_batch, run.di.device
    sums = torch.zeros(len(_PARTS), dtype=torch.float64, device=device)
    zero = torch.zeros((), device=device)
    for i in range(accum):
        xm, ym = x[i * m:(i + 1) * m], y[i * m:(i + 1) * m]
        em = {k: v[i * m:(i + 1) * m] for k, v in extras.items()}
        if run.conditions is not None:  # multi/text conditioning: the batch's condition from its extras
            ym = run.conditions(ym, em)
        last = i == accum - 1
        no_sync = run.model.no_sync() if (run.di.distributed and not last) else contextlib.nullcontext()
        with no_sync:
            with _autocast(device, run.amp_dtype):
                targets = None
                if run.targets is not None:
                    targets = run.targets(xm, em, run.raw.grid)
                out = run.objective(run.model, xm, ym, generator=run.gen, progress=run.images, align_targets=targets)
            run.scaler.scale(out.loss / accum).backward()
        sums += torch.stack([out.parts.get(k, zero).to(device) for k in _PARTS]).double() / accum
    return sums


def _reduce(run: Run, sums: Tensor, gnorm: Tensor, stop_requested: bool) -> list[float]:
    """The step's one synchronisation: [loss, positive, negative, repa, non-finite, stop] summed over ranks
    (an all-reduce queued on the device) and this rank's grad norm, read with a single ``.tolist()``."""
    bad = ~torch.isfinite(sums[0])
    if run.cfg.train.precision != "fp16":  # under fp16 the GradScaler skips steps with inf gradients
        bad = bad | ~torch.isfinite(gnorm)
    # torch.full, not torch.tensor: a fill on the device, no (blocking) host -> device copy
    stop = torch.full((1,), float(stop_requested), dtype=torch.float64, device=sums.device)
    flags = all_reduce_sum(torch.cat([sums, bad.double()[None], stop]))
    return torch.cat([flags, gnorm.detach().double().reshape(1).to(flags.device)]).tolist()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
