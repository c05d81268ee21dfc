"""Figures of the toy study (matplotlib, Agg backend, PNG).

* ``trajectories.png`` — ODE trajectories from the source, coloured by class, one panel per variant
  (FM beside ΔFM: the analogue of the paper's Fig. 3), over the true class density contours;
* ``fields.png`` — the class velocity fields (unit arrows, one colour per class) at several t, over
  the points x_t of the data path (grey);
* ``metrics_vs_nfe.png`` — distance to the true classes, class accuracy and class-mean distance over
  NFE (Euler solid, Heun dashed);
* ``overlap_vs_t.png`` — overlap fraction and mean angle between the class fields over t.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from deltafm.solvers import sample_ode  # noqa: E402
from deltafm.toy.datasets import ToyDataset  # noqa: E402
from deltafm.toy.velocity import build_velocity  # noqa: E402

__all__ = ["write_figures", "CLASS_COLORS"]

CLASS_COLORS = ["#e4572e", "#2e86ab", "#76b041", "#a846a0", "#f3a712", "#17bebb", "#6c757d", "#d1495b"]


def _color(k: int) -> str:
    return CLASS_COLORS[k % len(CLASS_COLORS)]


def _labels(metrics: dict, names: list[str]) -> list[str]:
    return [n for n in names if n in metrics["variants"]]


def _density_contours(ax, dataset: ToyDataset, xlim, ylim) -> None:
    xs = torch.linspace(xlim[0], xlim[1], 200, dtype=torch.float64)
    ys = torch.linspace(ylim[0], ylim[1], 200, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    lp = dataset.log_prob_all(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1))
    for k in range(dataset.num_classes):
        p = lp[:, k].exp().reshape(gx.shape)
        top = float(p.max())
        if top <= 0:
            continue
        ax.contour(gx.numpy(), gy.numpy(), p.numpy(), levels=[0.14 * top, 0.61 * top], colors=_color(k),
                   linewidths=0.8, alpha=0.9)


@torch.no_grad()
def _trajectories(cfg, dataset, runs, metrics, out: Path) -> str:
    names = _labels(metrics, cfg.figure_variants)
    if not names:
        return ""
    var_by_name = {v.name: v for v in cfg.variants}
    n = cfg.trajectories_per_class
    gen = torch.Generator().manual_seed(cfg.seed + 40_000)
    y = torch.arange(dataset.num_classes).repeat_interleave(n)
    x0 = dataset.sample_source(y.shape[0], gen)
    steps = max(cfg.nfe)
    trajs = {}
    for name in names:
        vel = build_velocity(var_by_name[name], runs, dataset, y)
        res = sample_ode(vel, x0, steps=steps, method="euler", return_trajectory=True)
        trajs[name] = torch.stack(res.trajectory)  # (T+1, B, 2)
    allp = torch.cat([t.reshape(-1, 2) for t in trajs.values()])
    allp = allp[torch.isfinite(allp).all(1)]
    lo, hi = allp.quantile(0.001, dim=0), allp.quantile(0.999, dim=0)
    pad = 0.08 * (hi - lo).clamp_min(1.0)
    xlim, ylim = (float(lo[0] - pad[0]), float(hi[0] + pad[0])), (float(lo[1] - pad[1]), float(hi[1] + pad[1]))
    ncol = 2 if len(names) > 2 else len(names)
    nrow = -(-len(names) // ncol)
    span_x, span_y = xlim[1] - xlim[0], ylim[1] - ylim[0]
    w = 6.0 if span_x > 2 * span_y else 4.2
    h = min(max(w * span_y / span_x, 2.4), 5.0)
    fig, axes = plt.subplots(nrow, ncol, figsize=(w * ncol, (h + 0.5) * nrow), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        tr = trajs[name]
        for i in range(tr.shape[1]):
            ax.plot(tr[:, i, 0], tr[:, i, 1], color=_color(int(y[i])), lw=0.7, alpha=0.45)
        ax.scatter(tr[0, :, 0], tr[0, :, 1], s=4, c="k", alpha=0.5, zorder=3)
        ax.scatter(tr[-1, :, 0], tr[-1, :, 1], s=6, c=[_color(int(k)) for k in y], zorder=4,
                   edgecolors="k", linewidths=0.2)
        _density_contours(ax, dataset, xlim, ylim)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_title(metrics["variants"][name]["label"], fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{cfg.preset}: Euler {steps} steps from the source (black), coloured by class; "
                 "contours: true class densities", fontsize=9)
    fig.tight_layout()
    path = out / "trajectories.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path.name


@torch.no_grad()
def _fields(cfg, dataset, runs, metrics, out: Path) -> str:
    """Quivers per class at several t.  ``quiver_mode="direction"``: unit arrows of v_k;
    ``"deviation"``: the class-specific part v_k − mean_j v_j at a scale shared by each column (when
    all classes move almost the same way, as in the paper setting, this is what differs)."""
    names = _labels(metrics, cfg.quiver_variants)
    if not names:
        return ""
    var_by_name = {v.name: v for v in cfg.variants}
    gen = torch.Generator().manual_seed(cfg.seed + 50_000)
    times = cfg.quiver_times
    deviation = cfg.quiver_mode == "deviation"
    fig, axes = plt.subplots(len(names), len(times), figsize=(3.6 * len(times), 3.2 * len(names)), squeeze=False)
    m = 11 if deviation else 13
    for j, t in enumerate(times):
        x1, _ = dataset.sample(600, gen)
        xt = t * x1 + (1 - t) * dataset.sample_source(600, gen)
        lo, hi = xt.quantile(0.01, dim=0), xt.quantile(0.99, dim=0)
        pad = 0.1 * (hi - lo).clamp_min(0.5)
        gx, gy = torch.meshgrid(torch.linspace(float(lo[0] - pad[0]), float(hi[0] + pad[0]), m),
                                torch.linspace(float(lo[1] - pad[1]), float(hi[1] + pad[1]), m), indexing="xy")
        grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
        tt = torch.full((grid.shape[0],), float(t))
        arrows = {}
        for name in names:
            fields = torch.stack([
                build_velocity(var_by_name[name], runs, dataset, torch.full((grid.shape[0],), k, dtype=torch.long))(
                    grid, tt)
                for k in range(dataset.num_classes)
            ])
            if deviation:
                arrows[name] = fields - fields.mean(0, keepdim=True)
            else:
                arrows[name] = fields / fields.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        # one arrow scale per column: the largest arrow spans ~1.5 grid cells
        top = max(float(a.norm(dim=-1).max()) for a in arrows.values()) if deviation else 1.0
        for i, name in enumerate(names):
            ax = axes[i][j]
            ax.scatter(xt[:, 0], xt[:, 1], s=2, c="0.75", zorder=1)
            for k in range(dataset.num_classes):
                u = arrows[name][k]
                ax.quiver(grid[:, 0], grid[:, 1], u[:, 0], u[:, 1], color=_color(k), alpha=0.8, angles="xy",
                          scale=top * m / 1.5, scale_units="width", width=0.004, zorder=2)
            ax.set_title(f"{metrics['variants'][name]['label']}, t={t:g}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    what = ("class-specific part v_k − mean_j v_j (same scale within a column)" if deviation
            else "direction of each class's velocity field")
    fig.suptitle(f"{what}; colour = class; grey: x_t of the data path", fontsize=9)
    fig.tight_layout()
    path = out / "fields.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _metric_curves(cfg, metrics, out: Path) -> str:
    keys = [("w2_mean", "W2 to true class (mean over classes)" if cfg.distance == "exact_w2" else "sliced W2"),
            ("accuracy", "class accuracy"), ("class_mean_distance", "distance between class means")]
    ref = metrics["reference"]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.0))
    styles = {"euler": "-", "heun": "--", "midpoint": ":", "rk4": "-."}
    cmap = plt.get_cmap("tab20")
    for idx, var in enumerate(metrics["variants"].values()):
        color = cmap(idx % 20)
        for solver, rows in var["solvers"].items():
            if not rows:
                continue
            nfe = [rows[k]["nfe"] for k in rows]
            for ax, (key, _) in zip(axes, keys):
                vals = [rows[k][key] for k in rows]
                ax.plot(nfe, vals, styles.get(solver, "-"), color=color, marker="o", ms=2.5, lw=1.1,
                        label=var["label"] if solver == cfg.solvers[0] else None)
    for ax, (_, title) in zip(axes, keys):
        ax.set_xscale("log")
        ax.set_xlabel("NFE")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].axhline(ref["true_vs_true_distance"], color="k", lw=0.8, ls=":", label="floor: two true sets")
    axes[1].axhline(ref["bayes_rate"], color="k", lw=0.8, ls=":", label="Bayes rate")
    axes[2].axhline(ref["true_class_mean_distance"], color="k", lw=0.8, ls=":", label="true")
    for ax in axes:
        ax.legend(handles=ax.get_lines()[-1:], fontsize=7, loc="best")
    fig.legend(handles=[ln for ln in axes[0].get_lines() if not ln.get_label().startswith("_")][:-1],
               fontsize=7, loc="lower center", ncol=4, frameon=False)
    fig.suptitle(f"{cfg.preset}: solid = " + ", dashed = ".join(cfg.solvers[:2]), fontsize=9)
    fig.tight_layout(rect=(0, 0.05 + 0.025 * ((len(metrics["variants"]) + 3) // 4), 1, 1))
    path = out / "metrics_vs_nfe.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def _overlap_curves(cfg, metrics, out: Path) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    cmap = plt.get_cmap("tab20")
    for idx, (_, var) in enumerate(metrics["variants"].items()):
        rows = var["overlap"]["per_t"]
        ts = [r["t"] for r in rows]
        axes[0].plot(ts, [r["overlap"] for r in rows], "-o", ms=2.5, color=cmap(idx % 20), label=var["label"])
        axes[1].plot(ts, [r["angle_deg"] for r in rows], "-o", ms=2.5, color=cmap(idx % 20))
    axes[0].set_title(f"fraction of shared x_t where class fields are within {cfg.overlap_angle:g}°", fontsize=9)
    axes[1].set_title("mean angle between class fields (°)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
    fig.legend(handles=axes[0].get_lines(), fontsize=7, loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.05 + 0.03 * ((len(metrics["variants"]) + 3) // 4), 1, 1))
    path = out / "overlap_vs_t.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def write_figures(cfg, dataset: ToyDataset, runs: dict, metrics: dict[str, Any], out: Path) -> dict[str, str]:
    """Write all figures into ``out``; returns {figure: file name}."""
    out.mkdir(parents=True, exist_ok=True)
    figs = {
        "trajectories": _trajectories(cfg, dataset, runs, metrics, out),
        "fields": _fields(cfg, dataset, runs, metrics, out),
        "metrics_vs_nfe": _metric_curves(cfg, metrics, out),
        "overlap_vs_t": _overlap_curves(cfg, metrics, out),
    }
    return {k: v for k, v in figs.items() if v}
