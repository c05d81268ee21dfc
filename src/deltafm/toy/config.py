"""What defines a toy study: the training runs, the sampling variants, the evaluation budget, presets.

:class:`ToyConfig` is serialised into ``metrics.json``; :data:`PRESETS` names the settings of
``docs/TOY.md`` (``deltafm toy --list-presets``) and :func:`preset_config` applies overrides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainSpec", "VariantSpec", "ToyConfig", "PRESETS", "preset_config"]


@dataclass
class TrainSpec:
    """One training run: ``lam`` = 0 with ``negatives="none"`` is plain FM."""

    name: str
    lam: float = 0.0
    negatives: str = "none"


@dataclass
class VariantSpec:
    """How to sample from a run: raw, bias-corrected (``to_fm``), mapped (``to_delta``) or oracle.

    ``lam``: λ of the map (defaults to the run's λ for ``to_fm``).  ``negatives``: whose mean
    target ū the ``to_delta`` map uses.  For ``source="oracle"`` the closed-form field with ``lam``
    (0 = FM) and ``negatives`` is used and ``run`` is ignored.
    """

    name: str
    label: str
    run: str = ""
    direction: str | None = None
    lam: float | None = None
    source: str = "model"
    negatives: str = "uniform"


@dataclass
class ToyConfig:
    """Everything that defines a study run (serialised into ``metrics.json``)."""

    preset: str = "custom"
    dataset: str = "paper"
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    model: str = "reference"
    steps: int = 2000
    batch_size: int = 1024
    lr: float = 5e-3
    weight_decay: float = 0.01
    lr_schedule: str = "cosine"
    label_dropout: float = 0.0
    seed: int = 0
    runs: list[TrainSpec] = field(default_factory=list)
    variants: list[VariantSpec] = field(default_factory=list)
    nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 100])
    solvers: list[str] = field(default_factory=lambda: ["euler", "heun"])
    eval_per_class: int = 500
    distance: str = "exact_w2"
    overlap_times: list[float] = field(default_factory=lambda: [0.1 * i for i in range(1, 10)])
    overlap_points: int = 1000
    overlap_angle: float = 5.0
    threads: int | None = 1
    figure_variants: list[str] = field(default_factory=list)
    quiver_variants: list[str] = field(default_factory=list)
    quiver_times: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    quiver_mode: str = "direction"
    trajectories_per_class: int = 48

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _standard_runs(lams: tuple[float, ...], dc_lam: float | None) -> list[TrainSpec]:
    runs = [TrainSpec("fm", 0.0, "none")]
    runs += [TrainSpec(f"dfm{lam:g}", lam, "uniform") for lam in lams]
    if dc_lam is not None:
        runs.append(TrainSpec(f"dfm_dc{dc_lam:g}", dc_lam, "different_class"))
    return runs


def _standard_variants(lams: tuple[float, ...], dc_lam: float | None, oracle: bool) -> list[VariantSpec]:
    v = [VariantSpec("fm", "FM", "fm")]
    for lam in lams:
        v.append(VariantSpec(f"fm_map{lam:g}", f"FM → ΔFM map λ={lam:g}", "fm", "to_delta", lam))
    for lam in lams:
        v.append(VariantSpec(f"dfm{lam:g}", f"ΔFM λ={lam:g}", f"dfm{lam:g}"))
        v.append(VariantSpec(f"dfm{lam:g}_corr", f"ΔFM λ={lam:g} + correction", f"dfm{lam:g}", "to_fm"))
    if dc_lam is not None:
        v.append(VariantSpec(f"dfm_dc{dc_lam:g}", f"ΔFM diff-class λ={dc_lam:g}", f"dfm_dc{dc_lam:g}"))
        v.append(
            VariantSpec(f"dfm_dc{dc_lam:g}_corr", f"ΔFM diff-class λ={dc_lam:g} + correction",
                        f"dfm_dc{dc_lam:g}", "to_fm")
        )
    if oracle:
        v.append(VariantSpec("oracle_fm", "exact FM field", source="oracle", lam=0.0))
        big = max(lams)
        v.append(VariantSpec(f"oracle_dfm{big:g}", f"exact ΔFM optimum λ={big:g}", source="oracle", lam=big))
    return v


def _preset(name: str, dataset: str, model: str, steps: int, batch: int, lams=(0.05, 0.5), dc_lam=0.5,
            oracle=False, **kw) -> ToyConfig:
    big = max(lams)
    cfg = ToyConfig(
        preset=name, dataset=dataset, model=model, steps=steps, batch_size=batch,
        runs=_standard_runs(lams, dc_lam), variants=_standard_variants(lams, dc_lam, oracle),
        figure_variants=["fm", f"dfm{min(lams):g}", f"dfm{big:g}", f"dfm{big:g}_corr"],
        quiver_variants=["fm", f"dfm{big:g}", f"dfm{big:g}_corr"], **kw,
    )
    return cfg


PRESETS: dict[str, Callable[[], ToyConfig]] = {
    # The reference notebook's setting (source at (-15, 0), two overlapping classes, small tanh MLP).
    "paper-fig3": lambda: _preset("paper-fig3", "paper", "reference", 2000, 1024, oracle=True,
                                  quiver_mode="deviation"),
    "8gaussians": lambda: _preset("8gaussians", "8gaussians", "wide", 1500, 512, oracle=True, lr=2e-3,
                                  weight_decay=0.0, eval_per_class=250),
    "moons": lambda: _preset("moons", "moons", "wide", 1500, 512, lr=2e-3, weight_decay=0.0),
    "checkerboard": lambda: _preset("checkerboard", "checkerboard", "wide", 1500, 512, lr=2e-3,
                                    weight_decay=0.0),
    "rings": lambda: _preset("rings", "rings", "wide", 1500, 512, lr=2e-3, weight_decay=0.0,
                             eval_per_class=350),
    # A seconds-long smoke run (tests, CI): every code path, tiny budgets.
    "tiny": lambda: _preset("tiny", "paper", "reference", 30, 128, oracle=True, eval_per_class=40,
                            nfe=[1, 2, 8], overlap_points=64, overlap_times=[0.25, 0.75], trajectories_per_class=8),
}


def preset_config(name: str, **overrides: Any) -> ToyConfig:
    """A preset's :class:`ToyConfig` with fields replaced by ``overrides`` (None values ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown toy preset {name!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    for key, value in overrides.items():
        if value is None:
            continue
        if not hasattr(cfg, key):
            raise ValueError(f"ToyConfig has no field {key!r}")
        setattr(cfg, key, value)
    return cfg
