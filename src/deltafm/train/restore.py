"""Checkpoint -> a model ready to sample, and the one rule for how it is sampled.

:func:`load_for_sampling` rebuilds the model of a checkpoint written by ``deltafm train`` (its EMA
weights by default) with the builders of :mod:`deltafm.train.builders`, and the objective with its
stored mean target. :meth:`LoadedModel.correction` is the single owner of "which affine map, with
which λ" a checkpoint is sampled with (the CLI, the study and the training loop's sample grids all
ask it, or the objective's :meth:`~deltafm.objective.DeltaFMObjective.sampling_correction` it wraps).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deltafm.correction import BiasCorrection
from deltafm.objective import DeltaFMObjective

from .builders import DataInfo, build_model_for, build_objective
from .checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from .config import Config, config_from_dict
from .state import RunState

__all__ = ["LoadedModel", "load_for_sampling"]


@dataclass
class LoadedModel:
    """A model restored from a checkpoint, with what sampling needs."""

    model: nn.Module
    config: Config
    data: DataInfo
    objective: DeltaFMObjective  # carries the stored mean target
    checkpoint: Path
    step: int
    images_seen: int
    ema: bool

    @property
    def lam(self) -> float:
        """λ the model was trained with at its last step (0 for flow matching)."""
        return self.objective.lam_at(self.images_seen)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Per-sample shape (C, H, W) in model space."""
        return (self.data.channels, self.data.image_size, self.data.image_size)

    def correction(self, map: str = "none", lam: float | None = None,
                   interval: tuple[float, float] | None = (0.0, 1.0)) -> BiasCorrection | None:
        """The map to sample with: ``none``, ``to_fm`` (ΔFM bias correction at the trained λ; None for an
        FM model) or ``to_delta`` (post-hoc map of an FM model to the ΔFM optimum with ``lam``), acting on
        the t-window ``interval`` (:func:`deltafm.correction.correction_window`; None: no map)."""
        try:
            return self.objective.sampling_correction(map, self.images_seen, lam=lam if map == "to_delta" else None,
                                                      interval=interval)
        except ValueError as e:
            raise ValueError(f"checkpoint {self.checkpoint}: {e}") from None


def load_for_sampling(ckpt: str | Path, ema: bool = True, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the model of a checkpoint (its EMA weights by default) and its objective's mean target."""
    path = resolve_checkpoint(ckpt, lambda m: print(f"warning: {m}", file=sys.stderr, flush=True))
    c = load_checkpoint(path, weights_only=True, verify=False)  # resolve_checkpoint verified it
    st = RunState.from_checkpoint(c.state)
    if st.config is None or st.data is None:
        raise CheckpointError(f"checkpoint {path} has no config/data record; was it written by deltafm train?")
    cfg = config_from_dict(st.config)
    info = DataInfo.from_dict(st.data)
    model = build_model_for(cfg, info, check=False)
    weights = c.model
    used_ema = False
    if ema:
        if c.ema is None:
            print(f"note: {path} has no EMA weights; using the model weights", file=sys.stderr, flush=True)
        else:
            weights, used_ema = c.ema, True
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit model {cfg.model.name!r}: {e}") from None
    model.to(device).eval().requires_grad_(False)
    objective = build_objective(cfg, info.num_classes, info.conditioning)
    if st.mean_target:
        objective.load_state_dict(st.mean_target)
    return LoadedModel(model, cfg, info, objective, path, st.step, st.images_seen, used_ema)
