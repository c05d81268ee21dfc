"""``deltafm mean-target``: estimate the mean negative target ū of any checkpoint from a dataset.

    deltafm mean-target --ckpt runs/sit-xl2 --data latents --root data/imagenet256-latents --out runs/sit-xl2-ubar

ū(t, y) = α̇_t m1 + σ̇_t m0 needs the data mean m1 and the source mean m0 (overall and per class). Training
keeps them as it goes (:class:`deltafm.correction.MeanTarget`, updated by the objective on every batch);
a converted public checkpoint has none, so ``deltafm sample`` could not apply the ΔFM ↔ FM maps. This
command walks the dataset once in its stored order, in batches (``ds.load_batch``: one batch in memory at
a time; for latent shards with a std, x1 is the posterior mean μ, since E[μ + σε] = μ), draws for each batch t and
x0 ~ N(0, I) from one seeded generator exactly as the objective does (t first, then x0), and adds
(x1, x0, labels, t) to a fresh MeanTarget: the result is the objective's running state over the same
batches and draws. It is written into a copy of the checkpoint (``--out``) or, with ``--in-place``, replaces
the checkpoint's state (atomically, same step). The reference's stored vector is turned into the same
state by :func:`mean_target_from_vector`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deltafm.atomic import atomic_write
from deltafm.correction import MeanTarget
from deltafm.errors import CLI_ERRORS, cli_error
from deltafm.objective import DeltaFMObjective
from deltafm.paths import LinearPath, get_path
from deltafm.seeding import derive_seed

from .reader import ConvertError

__all__ = ["draw_source", "estimate_mean_target", "mean_target_from_vector", "mean_target_seed", "main"]

#: the random stream of the x0 (and t) draws, mixed with ``--seed``
STREAM = "mean-target"


def mean_target_seed(seed: int) -> int:
    """The generator seed of ``--seed`` (``derive_seed(seed, 0, "mean-target")``)."""
    return derive_seed(seed, 0, STREAM)


def draw_source(objective: DeltaFMObjective, x1: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(t, x0) for a batch, drawn in the objective's order: t from its time sampler, then x0 ~ N(0, I)."""
    t = objective.time_sampler.sample(x1.shape[0], generator=generator, device=x1.device, dtype=x1.dtype)
    x0 = torch.randn(x1.shape, generator=generator, device=generator.device, dtype=x1.dtype).to(x1.device)
    return t, x0


def estimate_mean_target(ds: Any, objective: DeltaFMObjective, batch_size: int = 256, seed: int = 0,
                         max_items: int | None = None, device: str | torch.device = "cpu",
                         progress: bool = False) -> MeanTarget:
    """MeanTarget of the first ``max_items`` items of ``ds`` (all by default), in order, ``batch_size`` at a time."""
    if batch_size < 1:
        raise ConvertError(f"--batch-size must be >= 1, got {batch_size}")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(mean_target_seed(seed))
    mt = MeanTarget(objective.num_classes)
    n = len(ds) if max_items is None else min(len(ds), max_items)
    if n < 1:
        raise ConvertError("the dataset has no items to estimate the mean target from")
    for start in range(0, n, batch_size):  # one batch in memory at a time (a LatentStore reads it from disk)
        end = min(n, start + batch_size)
        x1 = ds.load_batch(torch.arange(start, end)).to(device)  # latents: the posterior mean μ, no draw
        labels = ds.labels[start:end].to(device)
        t, x0 = draw_source(objective, x1, gen)
        mt.update(x1, x0, labels if objective.num_classes else None, t, objective.path)
        if progress:
            print(f"\rmean-target: {end}/{n} items", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return mt


def mean_target_from_vector(vector: Tensor, num_classes: int | None, shape: tuple[int, ...],
                            path: str = "linear") -> dict[str, Tensor]:
    """MeanTarget state with ū(t, y) = ``vector`` for every t and y (the reference's stored "interference").

    The reference sampler (its time t_ref = 1 − t, velocity v_ref = −v) uses v_ref ← (1 − λ) v_ref − λ I.
    In our time that is v ← (1 − λ) v + λ I, which is our bias correction v_FM = (1 − λ) v + λ ū with ū = +I.
    For the linear path ū = m1 − m0, so the state holds m1 = I, m0 = 0 (one count per class row) and the
    training-time rates E[α̇] = 1, E[σ̇] = −1.
    """
    if not isinstance(get_path(path), LinearPath):
        raise ConvertError(f"a stored mean vector is only meaningful for the linear path, not {path!r}")
    v = vector.detach().float()
    if v.ndim == len(shape) + 1 and v.shape[0] == 1:
        v = v[0]
    if tuple(v.shape) != tuple(shape):
        raise ConvertError(f"the mean vector has shape {tuple(vector.shape)}, expected {tuple(shape)} (C, H, W)")
    k = num_classes or 1
    flat = v.reshape(1, -1).double().expand(k, -1).clone()
    n = float(k)
    return {"sum_x1": flat, "sum_x0": torch.zeros_like(flat), "count": torch.ones(k, dtype=torch.float64),
            "sum_rates": torch.tensor([n, -n, n], dtype=torch.float64),
            "sample_shape": torch.tensor(list(shape), dtype=torch.long)}


# ------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltafm mean-target",
                                description="Estimate the mean negative target ū of a checkpoint from a dataset and "
                                            "store it with the checkpoint (for deltafm sample's ΔFM <-> FM maps).")
    p.add_argument("--ckpt", required=True, help="checkpoint folder or run folder (e.g. made by deltafm convert)")
    p.add_argument("--data", required=True, help="dataset name (deltafm.data.load_dataset), e.g. latents")
    p.add_argument("--root", default=None, help="dataset folder")
    p.add_argument("--split", default="train")
    p.add_argument("--image-size", type=int, default=None, help="folder datasets only")
    p.add_argument("--channels", type=int, default=None, help="folder datasets only")
    p.add_argument("--max-items", type=int, default=None, help="use only the first N items")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="seed of the x0 and t draws")
    p.add_argument("--device", default="cpu")
    dst = p.add_mutually_exclusive_group(required=True)
    dst.add_argument("--out", type=Path, help="new run folder for the copy (OUT/checkpoints/step_X)")
    dst.add_argument("--in-place", action="store_true", help="replace the checkpoint's state (same step, atomic)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _load_data(args: argparse.Namespace, info: Any) -> Any:
    from deltafm.data import load_dataset

    try:
        ds = load_dataset(args.data, root=args.root, split=args.split, image_size=args.image_size,
                          channels=args.channels, max_items=args.max_items)
    except FileNotFoundError as e:
        raise ConvertError(f"--data {args.data} --root {args.root}: {e}") from None
    except (ValueError, OSError) as e:
        raise ConvertError(f"cannot load --data {args.data} (--root {args.root}): {e}") from None
    want = (info.kind, info.channels, info.image_size, info.num_classes)
    got = (ds.kind, ds.channels, ds.image_size, ds.num_classes)
    if want != got:
        raise ConvertError(f"the dataset ({got[0]}, {got[1]}x{got[2]}x{got[2]}, {got[3]} classes) does not fit the "
                           f"checkpoint's model ({want[0]}, {want[1]}x{want[2]}x{want[2]}, {want[3]} classes)")
    if ds.kind == "latents" and abs(ds.latent_scale - info.latent_scale) > 1e-6 * max(1.0, info.latent_scale):
        raise ConvertError(f"the latents are scaled by {ds.latent_scale}, the checkpoint's model by "
                           f"{info.latent_scale}: encode the data as the model expects")
    return ds


def run(args: argparse.Namespace) -> str:
    from deltafm.train.builders import DataInfo, build_objective
    from deltafm.train.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
    from deltafm.train.config import config_from_dict
    from deltafm.train.state import RunState

    path = resolve_checkpoint(args.ckpt, lambda m: print(f"warning: {m}", file=sys.stderr))
    root = path.parent if args.in_place else Path(args.out) / "checkpoints"
    if not args.in_place:  # checked before the (long) estimation, so a bad --out costs nothing
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ConvertError(f"--out {args.out} is a file, not a folder: choose a new --out folder")
        if root.exists() and any(root.iterdir()):
            raise ConvertError(f"{root} is not empty: choose a new --out folder")
    c = load_checkpoint(path, verify=False)
    st = RunState.from_checkpoint(c.state)
    if st.config is None or st.data is None:
        raise ConvertError(f"checkpoint {path} has no config/data record")
    info = DataInfo.from_dict(st.data)
    objective = build_objective(config_from_dict(st.config), info.num_classes)
    ds = _load_data(args, info)
    mt = estimate_mean_target(ds, objective, args.batch_size, args.seed, args.max_items, args.device,
                              progress=not args.no_progress)
    state = dict(c.state)
    state["mean_target"] = mt.state_dict()
    final = save_checkpoint(root, c.step, c.model, state, c.ema)
    record = dict(source=str(path), data=args.data, root=args.root, split=args.split, items=int(mt.count.sum()),
                  batch_size=args.batch_size, seed=args.seed)
    text = json.dumps(record, indent=1) + "\n"
    atomic_write(final.parent.parent / "mean_target.json", lambda tmp: tmp.write_text(text))
    return f"wrote ū from {record['items']} items of {args.data} into {final}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        print(run(args))
    except CLI_ERRORS as e:
        print(cli_error(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
