"""From a typed config to the objects of a run: the data, the model, the objective.

One builder per object, used by training, sampling (:mod:`deltafm.train.restore`) and the study, so a
config means the same thing everywhere. Bad input becomes a :class:`SetupError` (data, model) or a
:class:`~deltafm.train.config.ConfigError` (objective settings) saying what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltafm.objective import DeltaFMObjective
from deltafm.schedules import LambdaSchedule
from deltafm.seeding import derive_seed

from .config import Config, ConfigError
from .errors import SetupError

__all__ = ["SetupError", "DataInfo", "load_training_data", "data_info", "build_model_for", "build_objective"]


@dataclass
class DataInfo:
    """What a model needs to know about its data (stored in checkpoints for ``deltafm sample``)."""

    name: str
    kind: str
    channels: int
    image_size: int
    num_classes: int
    num_items: int
    class_names: list[str] | None = None
    latent_scale: float = 1.0
    latent_shift: float = 0.0
    vae_source: str | None = None  # latents: where their VAE was loaded from (decoding, deltafm.vae.decoding)
    vae_identity: str | None = None  # latents: the VAE's content hash; a decoder must match it
    align_dims: list[int] | None = None  # REPA: the target token widths, one projector each (repa.* set)
    conditioning: dict[str, Any] | None = None  # multi/text conditioning (train.conditions.Conditions.describe)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataInfo:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def load_training_data(cfg: Config):
    """Load the configured dataset; missing files become a :class:`SetupError` saying what is expected."""
    from deltafm.data import load_dataset

    d = cfg.data
    try:
        return load_dataset(d.name, root=d.root, split=d.split, image_size=d.image_size, channels=d.channels,
                            max_items=d.max_items)
    except FileNotFoundError as e:
        raise SetupError(f"data.name={d.name!r}, data.root={d.root!r}: {e}") from None
    except (ValueError, OSError) as e:
        raise SetupError(f"cannot load data (data.name={d.name!r}, data.root={d.root!r}): {e}") from None


def data_info(ds: Any) -> DataInfo:
    """The :class:`DataInfo` of a loaded dataset (square items; otherwise a :class:`SetupError`)."""
    try:
        image_size = ds.image_size
    except ValueError as e:
        raise SetupError(str(e)) from None
    meta = getattr(ds, "meta", None) or {}
    return DataInfo(ds.name, ds.kind, ds.channels, image_size, ds.num_classes, len(ds),
                    list(ds.class_names) if ds.class_names else None, float(ds.latent_scale),
                    float(ds.latent_shift), meta.get("vae_source"), meta.get("vae"))


def build_model_for(cfg: Config, info: DataInfo, seed: int | None = None, check: bool = True) -> nn.Module:
    """Build ``cfg.model`` for the data; a model that cannot take the data is a :class:`SetupError`.

    Initialisation draws from the global torch RNG under ``seed`` (restored afterwards), so every rank
    builds the same weights. ``check`` runs one forward pass on a zero input to catch size problems.
    With ``repa.*`` targets the backbone is wrapped in an :class:`~deltafm.alignment.AlignedModel` with one
    projector per width in ``info.align_dims`` (initialised after the backbone, from the same stream, so
    the backbone's weights are those of the same config without REPA).
    """
    from deltafm.models import build_model

    from .conditions import Conditions

    conds = Conditions.from_description(info.conditioning, load_encoder=False)
    kw = dict(cfg.model.kwargs)
    if conds is not None:
        clash = sorted(set(kw) & set(conds.model_kwargs()))
        if clash:
            raise SetupError(f"model.kwargs {clash} come from the data and the conditioning section; remove them")
        kw.update(conds.model_kwargs())
        if conds.kind == "text" and not cfg.model.name.lower().startswith("mmdit"):
            raise SetupError(f"conditioning.kind=text needs a text-conditioned model (an MMDiT-* preset); "
                             f"{cfg.model.name} takes class ids or named conditions")
    for k in ("channel_mult", "attn_levels"):
        if isinstance(kw.get(k), list):
            kw[k] = tuple(kw[k])
    desc = (f"model {cfg.model.name!r} for {info.name} ({info.channels}x{info.image_size}x{info.image_size}, "
            f"{info.num_classes} classes)")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.train.seed if seed is None else seed, 0, "model-init"))
            model = build_model(cfg.model.name, in_channels=info.channels, image_size=info.image_size,
                                num_classes=info.num_classes, **kw)
            if cfg.repa.enabled:
                model = _aligned(model, cfg, info)
        if check:
            x = torch.zeros(1, info.channels, info.image_size, info.image_size)
            cond = conds.dummy() if conds is not None else torch.zeros(1, dtype=torch.long)
            with torch.no_grad():
                out = model(x, torch.zeros(1), cond)
            if out.shape != x.shape:
                raise ValueError(f"it returns shape {tuple(out.shape)} for input {tuple(x.shape)}")
    except (ValueError, TypeError) as e:
        raise SetupError(f"cannot use {desc}: {e}") from None
    return model


def _aligned(backbone: nn.Module, cfg: Config, info: DataInfo) -> nn.Module:
    from deltafm.alignment import AlignedModel

    r = cfg.repa
    if not info.align_dims or len(info.align_dims) != len(r.features) + len(r.encoders):
        raise ValueError(f"REPA needs the token width of each target (repa.features + repa.encoders), got "
                         f"{info.align_dims}")
    return AlignedModel(backbone, info.align_dims, encoder_depth=r.encoder_depth, projector_dim=r.projector_dim)


def build_objective(cfg: Config, num_classes: int, conditioning: dict[str, Any] | None = None) -> DeltaFMObjective:
    """The :class:`DeltaFMObjective` of ``cfg.objective`` (λ schedule included) for the data's classes, or
    for the run's multi/text ``conditioning`` (``DataInfo.conditioning``, with ``cfg.conditioning``'s rates)."""
    o, c = cfg.objective, cfg.conditioning
    kind = (conditioning or {}).get("kind", "class")
    extra: dict[str, Any] = {}
    if kind != "class":
        counts = {k: len(v) for k, v in (conditioning or {}).get("values", {}).items()}
        num_classes = counts[c.contrast_on] if c.contrast_on is not None else None  # type: ignore[assignment]
        extra = dict(conditioning=kind, joint_dropout=c.joint_dropout)
        if kind == "multi":
            extra.update(condition_dropout=dict(c.dropout) or None, contrast_on=c.contrast_on)
    lam: float | LambdaSchedule = o.lam
    if o.lam_schedule is not None:
        kw = dict(o.lam_schedule)
        kw.setdefault("end", o.lam)
        try:
            lam = LambdaSchedule(**kw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config key 'objective.lam_schedule': {e}") from None
    try:
        return DeltaFMObjective(
            path=o.path, time_sampler=o.time_sampler, lam=lam, negatives=o.negatives,
            gather_negatives=o.gather_negatives, num_classes=num_classes, label_dropout=o.label_dropout,
            contrast_unconditional=o.contrast_unconditional, negative_time=o.negative_time,
            hard_other_class=o.hard_other_class, hard_on=o.hard_on, time_sampler_kwargs=dict(o.time_kwargs) or None,
            align_coeff=cfg.repa.proj_coeff, **extra,
        )  # fmt: skip
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config section 'objective': {e}") from None
