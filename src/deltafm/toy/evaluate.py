"""Evaluation of the toy study: the metrics of every sampling variant (see :mod:`deltafm.toy.metrics`).

For every solver and NFE budget: per-class exact W2 (or sliced W2) between generated and fresh true
samples, class accuracy against the Bayes rate, distance between the generated class means,
trajectory straightness and path deviation; and, independent of the solver, the overlap of the
class velocity fields at shared points x_t of the data path.  All draws come from generators seeded
with the study seed, so the same seed gives the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from deltafm.guidance import GuidedVelocity
from deltafm.solvers import get_solver, nfe_to_steps, sample_ode
from deltafm.toy.config import ToyConfig, VariantSpec
from deltafm.toy.datasets import ToyDataset
from deltafm.toy.metrics import (
    bayes_rate,
    class_accuracy,
    exact_w2,
    field_overlap,
    path_deviation,
    sliced_w2,
    straightness,
)
from deltafm.toy.oracle import has_oracle
from deltafm.toy.train import TrainedRun
from deltafm.toy.velocity import build_velocity

__all__ = ["evaluate", "steps_within"]

Distance = Callable[[Tensor, Tensor], float]


def steps_within(solver: str, nfe: int) -> int | None:
    """Steps of a fixed-step ODE ``solver`` within a budget of ``nfe`` velocity evaluations: the
    largest multiple of its per-step cost not above ``nfe`` (None when not even one step fits)."""
    spec = get_solver(solver)
    if spec.kind != "ode" or spec.nfe_per_step is None:
        raise ValueError(f"the toy study needs fixed-step ODE solvers, got {solver!r}")
    return nfe_to_steps(solver, nfe - nfe % spec.nfe_per_step)


@dataclass
class _Draws:
    """The fixed evaluation draws: labels ``y``, source ``x0``, fresh true samples ``true`` per label,
    and (t, x_t) points of the class-mixture data path for the field overlap."""

    gen: torch.Generator
    y: Tensor
    x0: Tensor
    true: Tensor
    shared: list[tuple[float, Tensor]]


def _draws(cfg: ToyConfig, dataset: ToyDataset) -> _Draws:
    k_cls, n = dataset.num_classes, cfg.eval_per_class
    gen = torch.Generator().manual_seed(cfg.seed + 10_000)
    y = torch.arange(k_cls).repeat_interleave(n)
    x0 = dataset.sample_source(k_cls * n, gen)
    true = dataset.sample_class(y, gen)
    ov_gen = torch.Generator().manual_seed(cfg.seed + 20_000)
    shared: list[tuple[float, Tensor]] = []
    for t in cfg.overlap_times:
        x1s, _ = dataset.sample(cfg.overlap_points, ov_gen)
        x0s = dataset.sample_source(cfg.overlap_points, ov_gen)
        shared.append((float(t), t * x1s + (1.0 - t) * x0s))
    return _Draws(gen, y, x0, true, shared)


def _distance(cfg: ToyConfig) -> Distance:
    """The sample-set distance of ``cfg.distance`` (inf when the generated set is not finite)."""
    sw_gen_seed = cfg.seed + 30_000

    def distance(a: Tensor, b: Tensor) -> float:
        if not bool(torch.isfinite(a).all()):
            return math.inf
        if cfg.distance == "exact_w2":
            return exact_w2(a, b)
        return sliced_w2(a, b, generator=torch.Generator().manual_seed(sw_gen_seed))

    return distance


def _class_mean_distance(x: Tensor, y: Tensor, num_classes: int) -> float:
    means = torch.stack([x[y == k].double().mean(0) for k in range(num_classes)])
    i, j = torch.triu_indices(num_classes, num_classes, offset=1)
    return float((means[i] - means[j]).norm(dim=1).mean())


def _solver_rows(
    cfg: ToyConfig, dataset: ToyDataset, vel: GuidedVelocity, d: _Draws, distance: Distance
) -> dict[str, Any]:
    """{solver: {str(nfe): metrics of the samples}} for every solver and NFE budget that fits."""
    k_cls, y = dataset.num_classes, d.y
    per_solver: dict[str, Any] = {}
    for solver in cfg.solvers:
        rows: dict[str, Any] = {}
        for nfe in cfg.nfe:
            steps = steps_within(solver, nfe)
            if steps is None:
                continue
            res = sample_ode(vel, d.x0, steps=steps, method=solver, return_trajectory=True)
            xs = res.x
            w = [distance(xs[y == k], d.true[y == k]) for k in range(k_cls)]
            rows[str(nfe)] = {
                "nfe": res.nfe,
                "steps": steps,
                "w2": w,
                "w2_mean": float(sum(w) / len(w)),
                "accuracy": class_accuracy(dataset, xs, y),
                "class_mean_distance": _class_mean_distance(xs, y, k_cls),
                "straightness": float(straightness(res.trajectory).mean()),
                "path_deviation": float(path_deviation(res.trajectory, res.times).mean()),
            }
        per_solver[solver] = rows
    return per_solver


def _overlap(
    cfg: ToyConfig, var: VariantSpec, runs: dict[str, TrainedRun], dataset: ToyDataset, d: _Draws
) -> dict[str, Any]:
    """Overlap of the class velocity fields of ``var`` at the shared points x_t."""
    rows = []
    for t, xt in d.shared:
        fields = torch.stack([
            build_velocity(var, runs, dataset, torch.full((xt.shape[0],), k, dtype=torch.long))(
                xt, torch.full((xt.shape[0],), t)
            )
            for k in range(dataset.num_classes)
        ])
        rows.append({"t": t, **field_overlap(fields, cfg.overlap_angle)})
    return {
        "angle_threshold_deg": cfg.overlap_angle,
        "per_t": rows,
        "mean": float(sum(r["overlap"] for r in rows) / len(rows)),
        "angle_deg_mean": float(sum(r["angle_deg"] for r in rows) / len(rows)),
    }


def _true_vs_true(dataset: ToyDataset, cfg: ToyConfig, gen: torch.Generator, distance: Distance) -> float:
    """The metric's floor: mean over classes of the distance between two independent true sets."""
    n = cfg.eval_per_class
    vals = []
    for k in range(dataset.num_classes):
        lab = torch.full((n,), k, dtype=torch.long)
        vals.append(distance(dataset.sample_class(lab, gen), dataset.sample_class(lab, gen)))
    return float(sum(vals) / len(vals))


@torch.no_grad()
def evaluate(cfg: ToyConfig, dataset: ToyDataset, runs: dict[str, TrainedRun]) -> dict[str, Any]:
    """All metrics of every variant (see the module docstring); plain Python types."""
    for solver in cfg.solvers:
        steps_within(solver, 1)  # reject solvers the toy cannot run before any sampling
    d = _draws(cfg, dataset)
    distance = _distance(cfg)
    true_sep = _class_mean_distance(d.true, d.y, dataset.num_classes)
    variants: dict[str, Any] = {}
    for var in cfg.variants:
        if var.source == "oracle" and not has_oracle(dataset):
            continue
        if var.source == "model" and var.run not in runs:
            continue
        vel = build_velocity(var, runs, dataset, d.y)
        variants[var.name] = {
            "label": var.label,
            "run": var.run,
            "direction": var.direction,
            "lam": var.lam,
            "source": var.source,
            "solvers": _solver_rows(cfg, dataset, vel, d, distance),
            "overlap": _overlap(cfg, var, runs, dataset, d),
        }
    return {
        "reference": {
            "bayes_rate": bayes_rate(dataset),
            "true_class_mean_distance": true_sep,
            "true_vs_true_distance": _true_vs_true(dataset, cfg, d.gen, distance),
        },
        "variants": variants,
    }
