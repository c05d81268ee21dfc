"""Adapters that bring ΔFM into other libraries' training scripts, in those libraries' own conventions.

* :mod:`deltafm.adapters.diffusers_fm` — diffusers' flow-matching scripts (SD3, FLUX): the drop-in loss for
  their MSE line, the σ ↔ t conversions and the sampling-time bias correction. Needs only torch (diffusers is
  never imported here).

Not imported by ``import deltafm``; import ``deltafm.adapters`` explicitly.
"""

from .diffusers_fm import (
    DiffusersLossOutput,
    RunningMean,
    add_bias_correction,
    correct_prediction,
    delta_fm_loss_diffusers,
    deltafm_to_diffusers,
    diffusers_to_deltafm,
    sigma_to_t,
    sigma_to_timestep,
    t_to_sigma,
    timestep_to_sigma,
    u_bar_diffusers,
)

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
