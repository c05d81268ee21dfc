"""The run's AdamW: which torch implementation runs the update, and keeping that choice across a resume.

AdamW's update per parameter p with gradient g (step k, decoupled weight decay wd):

    m <- β1 m + (1 − β1) g,   v <- β2 v + (1 − β2) g²,
    p <- p − lr · wd · p − lr · (m / (1 − β1ᵏ)) / (sqrt(v / (1 − β2ᵏ)) + eps)

torch has three implementations of it: a loop over the parameter tensors (several element-wise kernels
per tensor), ``foreach`` (the same kernels over lists of tensors) and ``fused`` (one kernel reading p, g,
m, v once). They compute the same update with different rounding (not bit-equal to each other; each is
deterministic, so resume stays bit-exact with any one). On CPU torch's default is the loop; the fused
kernel is 4x faster for SiT-B/2's 130M parameters (benchmarks/RESULTS.md), a sixth of a bf16 step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .config import OptimConfig

__all__ = ["FUSED_DEVICES", "build_adamw", "restore_adamw"]

FUSED_DEVICES = ("cuda", "cpu")  # where deltafm asks for the fused kernel (torch has it on both)


def build_adamw(params: Iterable[torch.nn.Parameter], o: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with ``o``'s hyper-parameters; ``o.fused`` takes the fused kernel where
    :data:`FUSED_DEVICES` has the device, otherwise torch picks (``foreach`` on CUDA, the loop on CPU)."""
    fused = o.fused and device.type in FUSED_DEVICES
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                             fused=True if fused else None)


def restore_adamw(opt: torch.optim.AdamW, state: dict) -> None:
    """Load ``state`` into ``opt`` but keep ``opt``'s implementation: ``load_state_dict`` takes every group
    setting from the saved state, so a checkpoint written by a loop or foreach AdamW would otherwise
    switch a fused run back (and vice versa). The config decides, as for every other key."""
    impl = {k: opt.defaults.get(k) for k in ("fused", "foreach")}
    opt.load_state_dict(state)
    for group in opt.param_groups:
        group.update(impl)
