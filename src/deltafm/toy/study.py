"""The toy study: train FM and ΔFM side by side on a 2-D dataset, then measure the class flows.

Training runs (:class:`TrainSpec`) share the seed, the initial weights (one model, deep-copied) and
the data order: every step draws (x1, y), the source x0 and t from one data generator seeded with the
study seed, identically for every run; the objective's own generator only draws the negatives
(and label dropout).  Each run uses the core :class:`~deltafm.objective.DeltaFMObjective`.

Sampling variants (:class:`VariantSpec`) turn a trained run into a velocity field for the solver:

* the raw model;
* ``direction="to_fm"``: the ΔFM bias correction v_FM = (1 − λ) v + λ ū (core ``BiasCorrection``);
* ``direction="to_delta"``: the post-hoc map of an FM model to the ΔFM optimum
  v_λ = (v − λ ū) / (1 − λ);
* ``oracle``: the closed-form field (Gaussian datasets only, :mod:`deltafm.toy.oracle`).

Metrics per variant (see :mod:`deltafm.toy.metrics`), for every solver and NFE budget: per-class
exact W2 (or sliced W2) between generated and fresh true samples, class accuracy against the Bayes
rate, distance between the generated class means, trajectory straightness; and, independent of the
solver, the overlap of the class velocity fields at shared points x_t of the data path.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deltafm.guidance import BiasCorrection, GuidedVelocity
from deltafm.models.mlp import build_toy_mlp
from deltafm.objective import DeltaFMObjective
from deltafm.solvers import sample_ode
from deltafm.toy.datasets import ToyDataset, get_dataset
from deltafm.toy.metrics import (
    bayes_rate,
    class_accuracy,
    exact_w2,
    field_overlap,
    path_deviation,
    sliced_w2,
    straightness,
)
from deltafm.toy.oracle import GaussianOracle, has_oracle

__all__ = [
    "TrainSpec",
    "VariantSpec",
    "ToyConfig",
    "PRESETS",
    "preset_config",
    "TrainedRun",
    "train_runs",
    "build_velocity",
    "evaluate",
    "run_study",
    "results_table",
    "aggregate",
    "summary_table",
]

_PER_STEP_NFE = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


@dataclass
class TrainSpec:
    """One training run: ``lam`` = 0 with ``negatives="none"`` is plain FM."""

    name: str
    lam: float = 0.0
    negatives: str = "none"


@dataclass
class VariantSpec:
    """How to sample from a run: raw, bias-corrected (``to_fm``), mapped (``to_delta``) or oracle.

    ``lam``: λ of the map (defaults to the run's λ for ``to_fm``).  For ``source="oracle"`` the
    closed-form field with ``lam`` (0 = FM) and ``negatives`` is used and ``run`` is ignored.
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


# -- training ---------------------------------------------------------------------------------------


@dataclass
class TrainedRun:
    """A trained model with its objective (which holds the running mean target for ū)."""

    spec: TrainSpec
    model: nn.Module
    objective: DeltaFMObjective
    loss_curve: list[float]
    seconds: float


def _lr_factor(schedule: str, step: int, total: int) -> float:
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))
    raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {schedule!r}")


def train_runs(cfg: ToyConfig, dataset: ToyDataset, progress: bool = True) -> dict[str, TrainedRun]:
    """Train every :class:`TrainSpec` of ``cfg`` from the same initial weights and data order."""
    torch.manual_seed(cfg.seed)
    base = build_toy_mlp(cfg.model, num_classes=dataset.num_classes, dim=dataset.dim)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps * len(cfg.runs), desc="toy", unit="step", file=sys.stderr, leave=False)
    out: dict[str, TrainedRun] = {}
    for spec in cfg.runs:
        model = copy.deepcopy(base)
        obj = DeltaFMObjective(
            path="linear", time_sampler="uniform", lam=spec.lam, negatives=spec.negatives,
            num_classes=dataset.num_classes, label_dropout=cfg.label_dropout,
        )
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        data_gen = torch.Generator().manual_seed(cfg.seed)
        obj_gen = torch.Generator().manual_seed(cfg.seed + 1)
        curve: list[float] = []
        start = time.perf_counter()
        if bar is not None:
            bar.set_description(f"toy {spec.name}")
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(cfg.lr_schedule, step, cfg.steps)
            x1, y = dataset.sample(cfg.batch_size, data_gen)
            x0 = dataset.sample_source(cfg.batch_size, data_gen)
            t = obj.time_sampler.sample(cfg.batch_size, generator=data_gen)
            res = obj(model, x1, y, generator=obj_gen, progress=float(step * cfg.batch_size), noise=x0, t=t)
            opt.zero_grad(set_to_none=True)
            res.loss.backward()
            opt.step()
            if step % 50 == 0 or step == cfg.steps - 1:
                curve.append(float(res.parts["positive"]))
                if bar is not None:
                    bar.set_postfix(fm=f"{curve[-1]:.3f}")
            if bar is not None:
                bar.update(1)
        model.eval()
        out[spec.name] = TrainedRun(spec, model, obj, curve, time.perf_counter() - start)
    if bar is not None:
        bar.close()
    return out


# -- velocity fields --------------------------------------------------------------------------------


def build_velocity(
    variant: VariantSpec, runs: dict[str, TrainedRun], dataset: ToyDataset, cond: Tensor
) -> GuidedVelocity:
    """The solver's v(x, t) for ``variant`` with class ids ``cond`` (no CFG)."""
    if variant.source == "oracle":
        oracle = GaussianOracle(dataset, lam=variant.lam or 0.0, negatives=variant.negatives)
        return GuidedVelocity(oracle, cond)
    run = runs[variant.run]
    correction: BiasCorrection | None = None
    if variant.direction is not None:
        lam = variant.lam if variant.lam is not None else run.spec.lam
        if variant.direction == "to_delta":
            # post-hoc map of this (FM) run; ū for the negatives named by the variant
            correction = BiasCorrection(
                lam=lam, mean_target=run.objective.mean_target, path=run.objective.path,
                other_classes=variant.negatives == "different_class", direction="to_delta",
            )
        else:
            correction = run.objective.bias_correction(direction="to_fm", lam=lam)
    return GuidedVelocity(run.model, cond, correction=correction)


def _steps_for(nfe: int, solver: str) -> int:
    return nfe // _PER_STEP_NFE[solver]


def _class_mean_distance(x: Tensor, y: Tensor, num_classes: int) -> float:
    means = torch.stack([x[y == k].double().mean(0) for k in range(num_classes)])
    i, j = torch.triu_indices(num_classes, num_classes, offset=1)
    return float((means[i] - means[j]).norm(dim=1).mean())


@torch.no_grad()
def evaluate(cfg: ToyConfig, dataset: ToyDataset, runs: dict[str, TrainedRun]) -> dict[str, Any]:
    """All metrics of every variant (see the module docstring); plain Python types."""
    k_cls, n = dataset.num_classes, cfg.eval_per_class
    gen = torch.Generator().manual_seed(cfg.seed + 10_000)
    y = torch.arange(k_cls).repeat_interleave(n)
    x0 = dataset.sample_source(k_cls * n, gen)
    true = dataset.sample_class(y, gen)
    # shared points of the (class-mixture) data path for the field overlap
    ov_gen = torch.Generator().manual_seed(cfg.seed + 20_000)
    shared: list[tuple[float, Tensor]] = []
    for t in cfg.overlap_times:
        x1s, _ = dataset.sample(cfg.overlap_points, ov_gen)
        x0s = dataset.sample_source(cfg.overlap_points, ov_gen)
        shared.append((float(t), t * x1s + (1.0 - t) * x0s))
    sw_gen_seed = cfg.seed + 30_000

    def distance(a: Tensor, b: Tensor) -> float:
        if not bool(torch.isfinite(a).all()):
            return math.inf
        if cfg.distance == "exact_w2":
            return exact_w2(a, b)
        return sliced_w2(a, b, generator=torch.Generator().manual_seed(sw_gen_seed))

    true_sep = _class_mean_distance(true, y, k_cls)
    variants: dict[str, Any] = {}
    for var in cfg.variants:
        if var.source == "oracle" and not has_oracle(dataset):
            continue
        if var.source == "model" and var.run not in runs:
            continue
        vel = build_velocity(var, runs, dataset, y)
        per_solver: dict[str, Any] = {}
        for solver in cfg.solvers:
            rows: dict[str, Any] = {}
            for nfe in cfg.nfe:
                steps = _steps_for(nfe, solver)
                if steps < 1:
                    continue
                res = sample_ode(vel, x0, steps=steps, method=solver, return_trajectory=True)
                xs = res.x
                w = [distance(xs[y == k], true[y == k]) for k in range(k_cls)]
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
        ov_rows = []
        for t, xt in shared:
            fields = torch.stack([
                build_velocity(var, runs, dataset, torch.full((xt.shape[0],), k, dtype=torch.long))(
                    xt, torch.full((xt.shape[0],), t)
                )
                for k in range(k_cls)
            ])
            ov_rows.append({"t": t, **field_overlap(fields, cfg.overlap_angle)})
        variants[var.name] = {
            "label": var.label,
            "run": var.run,
            "direction": var.direction,
            "lam": var.lam,
            "source": var.source,
            "solvers": per_solver,
            "overlap": {
                "angle_threshold_deg": cfg.overlap_angle,
                "per_t": ov_rows,
                "mean": float(sum(r["overlap"] for r in ov_rows) / len(ov_rows)),
                "angle_deg_mean": float(sum(r["angle_deg"] for r in ov_rows) / len(ov_rows)),
            },
        }
    return {
        "reference": {
            "bayes_rate": bayes_rate(dataset),
            "true_class_mean_distance": true_sep,
            "true_vs_true_distance": _true_vs_true(dataset, cfg, gen, distance),
        },
        "variants": variants,
    }


def _true_vs_true(dataset: ToyDataset, cfg: ToyConfig, gen: torch.Generator, distance) -> float:
    """The metric's floor: mean over classes of the distance between two independent true sets."""
    n = cfg.eval_per_class
    vals = []
    for k in range(dataset.num_classes):
        lab = torch.full((n,), k, dtype=torch.long)
        vals.append(distance(dataset.sample_class(lab, gen), dataset.sample_class(lab, gen)))
    return float(sum(vals) / len(vals))


# -- the whole study ---------------------------------------------------------------------------------


def run_study(
    cfg: ToyConfig, out_dir: str | Path | None = None, progress: bool = True, figures: bool = True
) -> dict[str, Any]:
    """Train, evaluate and (with ``out_dir``) write ``metrics.json``, ``results.md`` and figures."""
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        dataset = get_dataset(cfg.dataset, **cfg.dataset_kwargs)
        t0 = time.perf_counter()
        runs = train_runs(cfg, dataset, progress=progress)
        t1 = time.perf_counter()
        metrics = evaluate(cfg, dataset, runs)
        t2 = time.perf_counter()
        metrics["config"] = cfg.to_dict()
        metrics["training"] = {
            name: {"seconds": r.seconds, "fm_loss_curve": r.loss_curve, "final_fm_loss": r.loss_curve[-1]}
            for name, r in runs.items()
        }
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            if figures:
                from deltafm.toy import plots

                metrics["figures"] = plots.write_figures(cfg, dataset, runs, metrics, out)
            (out / "results.md").write_text(results_table(metrics))
        metrics["timing"] = {
            "train_s": t1 - t0,
            "eval_s": t2 - t1,
            "total_s": time.perf_counter() - t0,
        }
        if out_dir is not None:
            (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return metrics
    finally:
        torch.set_num_threads(old_threads)


# -- tables -------------------------------------------------------------------------------------------


def _get(metrics: dict, var: str, solver: str, nfe: int, key: str) -> float | None:
    row = metrics["variants"][var]["solvers"].get(solver, {}).get(str(nfe))
    return None if row is None else row[key]


def _table_columns(cfg: dict) -> list[tuple[str, Any]]:
    """(header, getter(metrics, variant) -> float) for the summary tables."""
    nfes, solvers = cfg["nfe"], cfg["solvers"]
    hi = max(nfes)
    lo = 4 if 4 in nfes else min(nfes)
    cols: list[tuple[str, Any]] = []
    dist = "W2" if cfg["distance"] == "exact_w2" else "SW2"
    for solver, nfe in [("euler", lo), ("euler", hi), ("heun", hi)]:
        if solver in solvers:
            cols.append((f"{dist} {solver}-{nfe}", lambda m, v, s=solver, f=nfe: _get(m, v, s, f, "w2_mean")))
    s0 = "euler" if "euler" in solvers else solvers[0]
    cols.append((f"acc {s0}-{hi}", lambda m, v: _get(m, v, s0, hi, "accuracy")))
    cols.append((f"class-mean dist {s0}-{hi}", lambda m, v: _get(m, v, s0, hi, "class_mean_distance")))
    cols.append((f"overlap@{cfg['overlap_angle']:g}°", lambda m, v: m["variants"][v]["overlap"]["mean"]))
    cols.append(("mean angle (°)", lambda m, v: m["variants"][v]["overlap"]["angle_deg_mean"]))
    cols.append((f"path deviation S {s0}-{hi}", lambda m, v: _get(m, v, s0, hi, "path_deviation")))
    return cols


def _fmt(x: float | None) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return "inf"
    return f"{x:.3f}"


def results_table(metrics: dict) -> str:
    """Markdown summary of one study run."""
    cfg, ref = metrics["config"], metrics["reference"]
    cols = _table_columns(cfg)
    lines = [
        f"# Toy study `{cfg['preset']}` (dataset `{cfg['dataset']}`, model `{cfg['model']}`, seed {cfg['seed']})",
        "",
        f"{cfg['steps']} steps × batch {cfg['batch_size']}; {cfg['eval_per_class']} samples per class; "
        f"Bayes rate {ref['bayes_rate']:.3f}; true class-mean distance {ref['true_class_mean_distance']:.3f}; "
        f"distance between two true sample sets (metric floor) {ref['true_vs_true_distance']:.3f}.",
        "",
        "| variant | " + " | ".join(h for h, _ in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name, var in metrics["variants"].items():
        lines.append(f"| {var['label']} | " + " | ".join(_fmt(g(metrics, name)) for _, g in cols) + " |")
    return "\n".join(lines) + "\n"


def aggregate(all_metrics: list[dict]) -> dict[str, Any]:
    """Mean and sample standard deviation over seeds of every summary-table entry."""
    cfg = all_metrics[0]["config"]
    cols = _table_columns(cfg)
    out: dict[str, Any] = {"seeds": [m["config"]["seed"] for m in all_metrics], "columns": [h for h, _ in cols],
                           "variants": {}}
    for name, var in all_metrics[0]["variants"].items():
        row = {}
        for header, getter in cols:
            vals = [getter(m, name) for m in all_metrics]
            vals = [v for v in vals if v is not None]
            if not vals:
                row[header] = None
                continue
            mean = sum(vals) / len(vals)
            sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            row[header] = {"mean": mean, "std": sd, "values": vals}
        out["variants"][name] = {"label": var["label"], **row}
    refs = [m["reference"] for m in all_metrics]
    out["reference"] = {k: sum(r[k] for r in refs) / len(refs) for k in refs[0]}
    return out


def summary_table(agg: dict) -> str:
    """Markdown table of :func:`aggregate` (mean ± std over seeds)."""
    cols = agg["columns"]
    ref = agg["reference"]
    lines = [
        f"Seeds {agg['seeds']}: mean ± standard deviation over seeds. Bayes rate {ref['bayes_rate']:.3f}; "
        f"true class-mean distance {ref['true_class_mean_distance']:.3f}; metric floor "
        f"(two true sample sets) {ref['true_vs_true_distance']:.3f}.",
        "",
        "| variant | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for var in agg["variants"].values():
        cells = []
        for c in cols:
            v = var[c]
            cells.append("–" if v is None else f"{_fmt(v['mean'])} ± {_fmt(v['std'])}")
        lines.append(f"| {var['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
