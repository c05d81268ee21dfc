"""The velocity field the solver integrates for a sampling variant of the toy study.

A :class:`~deltafm.toy.config.VariantSpec` turns a trained run into v(x, t):

* the raw model;
* ``direction="to_fm"``: the ΔFM bias correction v_FM = (1 − λ) v + λ ū;
* ``direction="to_delta"``: the post-hoc map of an FM model to the ΔFM optimum
  v_λ = (v − λ ū) / (1 − λ);
* ``source="oracle"``: the closed-form field (Gaussian datasets only, :mod:`deltafm.toy.oracle`).

Which map and which λ a trained model is sampled with is decided by the run's objective
(:meth:`~deltafm.objective.DeltaFMObjective.sampling_correction`); the variant only names the map
and, optionally, λ and the negatives whose mean ū is.
"""

from __future__ import annotations

from torch import Tensor

from deltafm.guidance import GuidedVelocity
from deltafm.toy.config import VariantSpec
from deltafm.toy.datasets import ToyDataset
from deltafm.toy.oracle import GaussianOracle
from deltafm.toy.train import TrainedRun

__all__ = ["build_velocity"]


def build_velocity(
    variant: VariantSpec, runs: dict[str, TrainedRun], dataset: ToyDataset, cond: Tensor
) -> GuidedVelocity:
    """The solver's v(x, t) for ``variant`` with class ids ``cond`` (no CFG)."""
    if variant.source == "oracle":
        oracle = GaussianOracle(dataset, lam=variant.lam or 0.0, negatives=variant.negatives)
        return GuidedVelocity(oracle, cond)
    run = runs[variant.run]
    correction = None
    if variant.direction is not None:
        # to_fm: ū for the run's own negatives, λ the run's unless the variant names one;
        # to_delta (post-hoc map of an FM run): ū for the negatives named by the variant
        other = variant.negatives == "different_class" if variant.direction == "to_delta" else None
        correction = run.objective.sampling_correction(
            variant.direction, images_seen=run.images_seen, lam=variant.lam, other_classes=other
        )
    return GuidedVelocity(run.model, cond, correction=correction)
