"""Training of the toy study: every run from the same initial weights and the same data order.

Each step draws (x1, y), the source x0 and t from one data generator seeded with the study seed,
identically for every run; the objective's own generator only draws the negatives (and label
dropout).  Each run uses the core :class:`~deltafm.objective.DeltaFMObjective`.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from deltafm.models.mlp import build_toy_mlp
from deltafm.objective import DeltaFMObjective
from deltafm.toy.config import ToyConfig, TrainSpec
from deltafm.toy.datasets import ToyDataset

__all__ = ["TrainedRun", "train_runs"]


@dataclass
class TrainedRun:
    """A trained model with its objective (which holds the running mean target for ū) and the
    number of training images it saw (where the objective's λ schedule ended)."""

    spec: TrainSpec
    model: nn.Module
    objective: DeltaFMObjective
    loss_curve: list[float]
    seconds: float
    images_seen: int = 0


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
        out[spec.name] = TrainedRun(spec, model, obj, curve, time.perf_counter() - start,
                                    images_seen=cfg.steps * cfg.batch_size)
    if bar is not None:
        bar.close()
    return out
