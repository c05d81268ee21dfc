"""``deltafm sample``: a checkpoint -> images (PNG grids, ``samples.npz`` in the ADM layout, sample.json).

    deltafm sample --ckpt runs/X --num 100 --solver heun --steps 20 --cfg 1.5 --out samples/X

Defaults come from the checkpoint's ``sample`` section. Which map (bias correction) and λ the checkpoint is
sampled with is decided by :meth:`deltafm.train.restore.LoadedModel.correction`. Errors on bad input
print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from deltafm.solvers import SOLVERS

    s = argparse.ArgumentParser(prog="deltafm sample",
                                description="Sample from a checkpoint: PNG grid, per-class grids and samples.npz "
                                            "(ADM evaluation layout). Defaults come from the checkpoint's sample "
                                            "section.")
    s.add_argument("--ckpt", required=True, help="checkpoint folder, or a run folder (its newest valid checkpoint)")
    s.add_argument("--num", type=int, default=None, help="number of samples (default: sample.num)")
    s.add_argument("--solver", choices=list(SOLVERS), default=None)
    s.add_argument("--steps", type=int, default=None, help="solver steps (NFE per sample for euler/sde)")
    s.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale w (1 = off)")
    s.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="apply guidance for t in [LO, HI] (t=0 noise, t=1 data)")
    s.add_argument("--bias-correction", choices=["on", "off"], default=None,
                   help="ΔFM correction v_FM = (1-lam) v + lam * u_bar with the stored mean target")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--class", dest="class_id", type=int, default=None, help="sample only this class")
    s.add_argument("--batch-size", type=int, default=None)
    ema = s.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=True, help="use EMA weights (default)")
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw model weights")
    s.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    s.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    s.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast dtype for the model")
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    return s


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    threads = torch.get_num_threads()
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    try:
        return _sample(args)
    finally:
        torch.set_num_threads(threads)


def _sample(args: argparse.Namespace) -> int:
    import torch

    from deltafm.generate import generate, labels_for
    from deltafm.images import write_outputs
    from deltafm.pixels import to_uint8_nhwc
    from deltafm.solvers import get_solver
    from deltafm.train.restore import load_for_sampling

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = load_for_sampling(args.ckpt, ema=args.ema, device=device)
    sc = lm.config.sample
    num = args.num if args.num is not None else sc.num
    solver = args.solver or sc.solver
    steps = args.steps if args.steps is not None else sc.steps
    cfg_w = args.cfg if args.cfg is not None else sc.cfg
    interval = tuple(args.guidance_interval) if args.guidance_interval is not None else tuple(sc.interval)
    bc = (args.bias_correction == "on") if args.bias_correction is not None else sc.bias_correction
    seed = args.seed if args.seed is not None else sc.seed
    batch = args.batch_size if args.batch_size is not None else sc.batch_size
    if num < 1 or steps < 1 or batch < 1:
        raise ValueError("--num, --steps and --batch-size must be >= 1")
    lo, hi = interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"--guidance-interval must satisfy 0 <= LO <= HI <= 1, got {lo} {hi}")
    get_solver(solver)
    lam = lm.lam
    correction = None
    if bc:
        if lam <= 0:
            print("note: the model was trained with lam = 0 (plain FM): bias correction is the identity, skipped",
                  file=sys.stderr)
        else:
            correction = lm.correction("to_fm")
    labels = labels_for(num, lm.data.num_classes, args.class_id)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    x = generate(lm.model, labels=labels, shape=(lm.data.channels, lm.data.image_size, lm.data.image_size),
                 num_classes=lm.data.num_classes, solver=solver, steps=steps, cfg=cfg_w, interval=interval,
                 correction=correction, seed=seed, batch_size=batch, device=device, path=lm.objective.path,
                 amp_dtype=amp, progress=not args.no_progress)
    meta = dict(checkpoint=str(lm.checkpoint), step=lm.step, images_seen=lm.images_seen, ema=lm.ema,
                solver=solver, steps=steps, cfg=cfg_w, guidance_interval=list(interval),
                bias_correction=correction is not None, lam=lam, seed=seed, batch_size=batch,
                class_id=args.class_id)
    if lm.data.kind != "images":
        import json

        import numpy as np

        args.out.mkdir(parents=True, exist_ok=True)
        z = (x / lm.data.latent_scale + lm.data.latent_shift).numpy().astype(np.float32)
        np.savez(args.out / "latents.npz", arr_0=z, labels=labels.numpy())
        (args.out / "sample.json").write_text(json.dumps(meta, indent=1))
        print(f"wrote {num} latents to {args.out / 'latents.npz'} (decode them with the VAE used to encode)")
        return 0
    paths = write_outputs(args.out, to_uint8_nhwc(x), labels, lm.data.num_classes, meta, lm.data.class_names)
    print(f"wrote {num} samples: {paths['grid']}, {paths['npz']} and {len(labels.unique())} class grid(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``deltafm sample``; returns the exit status."""
    from deltafm.train.builders import SetupError
    from deltafm.train.checkpoint import CheckpointError
    from deltafm.train.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return _cmd_sample(args)
    except (ConfigError, CheckpointError, SetupError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
