"""Adapters that bring ΔFM into other libraries' training scripts, in those libraries' own conventions.

* :mod:`deltafm.adapters.diffusers_fm` — diffusers' flow-matching scripts (SD3, FLUX): the drop-in loss for
  their MSE line, the σ ↔ t conversions and the sampling-time bias correction. Needs only torch (diffusers is
  never imported here).

Not imported by ``import deltafm``; import ``deltafm.adapters`` explicitly.
"""

from . import diffusers_fm
from .diffusers_fm import *  # noqa: F403  (the public names are diffusers_fm.__all__, listed once there)

__all__ = list(diffusers_fm.__all__)
