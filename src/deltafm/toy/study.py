"""The toy study: train FM and ΔFM side by side on a 2-D dataset, then measure the class flows.

:func:`run_study` runs the pieces in order:

* :mod:`~deltafm.toy.config` — what the study is (:class:`~deltafm.toy.config.ToyConfig`, presets);
* :mod:`~deltafm.toy.train` — the training runs, from the same weights and data order;
* :mod:`~deltafm.toy.velocity` — a sampling variant of a run as the solver's velocity field;
* :mod:`~deltafm.toy.evaluate` — the metrics of every variant, solver and NFE;
* :mod:`~deltafm.toy.tables` and :mod:`~deltafm.toy.plots` — ``results.md`` and the figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from deltafm.toy.config import ToyConfig
from deltafm.toy.datasets import get_dataset
from deltafm.toy.evaluate import evaluate
from deltafm.toy.tables import results_table
from deltafm.toy.train import train_runs

__all__ = ["run_study"]


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
