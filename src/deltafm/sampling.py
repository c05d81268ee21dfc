"""Checkpoint -> images: the engine of ``deltafm sample`` (and of the sample grids written in training).

For N samples with class labels y (balanced ``i mod K`` by default, or one class), noise x0 ~ N(0, I)
is drawn **per image** from a generator seeded with (seed, image index), so an image does not depend on
the batch size or on how many others are drawn. The velocity is the model under classifier-free
guidance (scale w, on the t-interval [lo, hi]; t = 0 noise, t = 1 data) with the optional ΔFM bias
correction v_FM = (1 − λ) v + λ ū (ū from the mean target stored in the checkpoint), integrated from
t = 0 to t = 1 by an ODE solver (euler, heun, midpoint, rk4, dopri5) or the Euler–Maruyama SDE sampler
(its noise comes from a generator seeded with (seed, first index of the batch): reproducible for a given
seed and batch size).

Outputs (:func:`write_outputs`): ``grid.png`` (one column per class), ``class_XXX.png`` per class,
``samples.npz`` in the layout of the ADM evaluation suite (``arr_0``: uint8 N×H×W×C, ``labels``: int64
N) and ``sample.json`` (the settings). Latent-space models write ``latents.npz`` (``arr_0``: the VAE
latents z = x / scale + shift, float32 N×C×H×W) instead; decoding them needs the VAE, not included.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deltafm.guidance import BiasCorrection, GuidedVelocity
from deltafm.paths import ProbPath
from deltafm.solvers import sample_ode, sample_sde

__all__ = [
    "SOLVERS",
    "LoadedModel",
    "load_for_sampling",
    "labels_for",
    "initial_noise",
    "generate",
    "to_uint8_nhwc",
    "make_grid",
    "save_grid",
    "write_outputs",
]

SOLVERS = ("euler", "heun", "midpoint", "rk4", "dopri5", "sde")


def labels_for(num: int, num_classes: int, class_id: int | None = None) -> Tensor:
    """Class labels of N samples: ``i mod K`` (balanced, in order), or all ``class_id``."""
    if class_id is not None:
        if not 0 <= class_id < num_classes:
            raise ValueError(f"class {class_id} out of range [0, {num_classes - 1}]")
        return torch.full((num,), class_id, dtype=torch.long)
    return torch.arange(num, dtype=torch.long) % num_classes


def initial_noise(start: int, count: int, shape: Sequence[int], seed: int) -> Tensor:
    """x0 of images ``start .. start+count-1``: each from its own generator seeded with (seed, index)."""
    from deltafm.train.distributed import derive_seed

    g = torch.Generator()
    out = torch.empty(count, *shape)
    for i in range(count):
        g.manual_seed(derive_seed(seed, start + i, "sample-noise"))
        out[i] = torch.randn(*shape, generator=g)
    return out


@torch.no_grad()
def generate(
    model: nn.Module,
    *,
    labels: Tensor,
    shape: Sequence[int],
    num_classes: int,
    solver: str = "euler",
    steps: int = 50,
    cfg: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
    correction: BiasCorrection | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    path: ProbPath | str = "linear",
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Tensor:
    """Samples in model space (float32, N×C×H×W, on CPU) for ``labels`` (N,)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; known: {', '.join(SOLVERS)}")
    device = torch.device(device)
    n = labels.shape[0]
    outs = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="img", desc=f"sampling ({solver}, {steps} steps)", dynamic_ncols=True)
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        x0 = initial_noise(start, count, shape, seed).to(device)
        cond = labels[start:start + count].to(device)
        vel = GuidedVelocity(model, cond, scale=cfg, interval=interval, null_class=num_classes,
                             correction=correction, amp_dtype=amp_dtype)
        if solver == "sde":
            from deltafm.train.distributed import make_generator

            gen = make_generator(seed, start, "sample-sde", device)
            res = sample_sde(vel, x0, steps=steps, path=path, generator=gen)
        else:
            res = sample_ode(vel, x0, steps=steps, method=solver)
        outs.append(res.x.float().cpu())
        if bar is not None:
            bar.update(count)
    if bar is not None:
        bar.close()
    return torch.cat(outs) if outs else torch.empty(0, *shape)


def to_uint8_nhwc(x: Tensor) -> np.ndarray:
    """Model-space images in [-1, 1] (N×C×H×W) -> uint8 N×H×W×C (p = round((x + 1)·127.5), clipped)."""
    from deltafm.data import model_to_uint8

    return model_to_uint8(x).permute(0, 2, 3, 1).contiguous().numpy()


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile uint8 N×H×W×C images row by row into one H'×W'×C array (``ncol`` per row)."""
    n, h, w, c = images.shape
    ncol = max(1, min(ncol or math.ceil(math.sqrt(n)), n)) if n else 1
    nrow = max(1, math.ceil(n / ncol))
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def save_grid(images: np.ndarray, path: str | Path, ncol: int | None = None, min_cell: int = 32) -> Path:
    """Write a PNG grid of uint8 N×H×W×C images (1 or 3 channels); small images are enlarged (nearest)
    so that each cell is at least ``min_cell`` pixels."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h = images.shape[1]
    scale = max(1, math.ceil(min_cell / max(h, 1)))
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    grid = make_grid(images, ncol)
    c = grid.shape[2]
    if c == 1:
        img = Image.fromarray(grid[:, :, 0], mode="L")
    elif c == 3:
        img = Image.fromarray(grid, mode="RGB")
    else:
        raise ValueError(f"cannot save {c}-channel images as PNG")
    img.save(path)
    return path


def write_outputs(out_dir: str | Path, images: np.ndarray, labels: Tensor | np.ndarray, num_classes: int,
                  meta: dict[str, Any] | None = None, class_names: Sequence[str] | None = None) -> dict[str, Path]:
    """Write grid.png, class_XXX.png, samples.npz (ADM layout) and sample.json; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels, dtype=np.int64)
    paths: dict[str, Path] = {}
    present = sorted(set(labels.tolist()))
    if len(present) > 1:  # one column per class, up to 10 rows
        paths["grid"] = save_grid(images[: len(present) * 10], out / "grid.png", ncol=len(present))
    else:
        paths["grid"] = save_grid(images[:64], out / "grid.png")
    for k in present:
        sel = images[labels == k]
        paths[f"class_{k}"] = save_grid(sel[:64], out / f"class_{k:03d}.png")
    np.savez(out / "samples.npz", arr_0=images, labels=labels)
    paths["npz"] = out / "samples.npz"
    info = dict(meta or {})
    info.update(num=int(images.shape[0]), num_classes=num_classes,
                class_names=list(class_names) if class_names else None)
    (out / "sample.json").write_text(json.dumps(info, indent=1))
    paths["meta"] = out / "sample.json"
    return paths


@dataclass
class LoadedModel:
    """A model restored from a checkpoint, with what sampling needs."""

    model: nn.Module
    config: Any  # deltafm.train.config.Config
    data: Any  # deltafm.train.loop.DataInfo
    objective: Any  # DeltaFMObjective carrying the stored mean target
    checkpoint: Path
    step: int
    images_seen: int
    ema: bool


def load_for_sampling(ckpt: str | Path, ema: bool = True, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the model of a checkpoint (its EMA weights by default) and its objective's mean target."""
    from deltafm.train.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
    from deltafm.train.config import config_from_dict
    from deltafm.train.loop import DataInfo, build_model_for, build_objective

    path = resolve_checkpoint(ckpt, lambda m: print(f"warning: {m}", file=sys.stderr, flush=True))
    c = load_checkpoint(path, weights_only=True, verify=False)  # resolve_checkpoint verified it
    if c.config is None or "data" not in c.state:
        raise CheckpointError(f"checkpoint {path} has no config/data record; was it written by deltafm train?")
    cfg = config_from_dict(c.config)
    info = DataInfo.from_dict(c.state["data"])
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
    objective = build_objective(cfg, info.num_classes)
    if c.state.get("mean_target"):
        objective.load_state_dict(c.state["mean_target"])
    return LoadedModel(model, cfg, info, objective, path, int(c.state.get("step", 0)),
                       int(c.state.get("images_seen", 0)), used_ema)
