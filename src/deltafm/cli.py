"""The ``deltafm`` command line: ``train``, ``sample``, ``eval``, ``compare`` and ``toy``.

    deltafm train --preset fmnist-unet-deltafm [key.sub=value ...] [--out DIR] [--resume auto|PATH] [--dry-run]
    deltafm train --config configs/X.yaml optim.lr=2e-4 train.steps=500
    torchrun --standalone --nproc_per_node=2 -m deltafm train --preset digits-tiny
    deltafm sample --ckpt runs/X --num 100 --solver heun --steps 20 --cfg 1.5 --out samples/X
    deltafm eval ...   (see ``deltafm eval --help``)
    deltafm compare ... (see ``deltafm compare --help``)
    deltafm toy ...    (see ``deltafm toy --help``)

Errors on bad input (unknown config key, missing data, bad checkpoint, ...) print one ``error:`` line and
exit with status 2, without touching anything already saved. See docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

_DISPATCH = {
    "toy": ("deltafm.toy.cli", "2-D toy study: FM vs ΔFM velocity fields and metrics"),
    "eval": ("deltafm.eval.cli", "evaluate samples: classifier FD, class accuracy"),
    "compare": ("deltafm.study.cli", "FM vs ΔFM side by side: train, sample, evaluate, report"),
}


def build_parser() -> argparse.ArgumentParser:
    from deltafm.solvers import SOLVERS

    p = argparse.ArgumentParser(
        prog="deltafm",
        description="Contrastive Flow Matching (ΔFM): train, sample, evaluate. Docs: docs/TRAINING.md",
    )
    sub = p.add_subparsers(dest="command", metavar="{train,sample,eval,compare,toy}")

    t = sub.add_parser("train", help="train a model from a YAML config (+ key=value overrides)",
                       description="Train a model. Config = YAML file or preset, then key.sub=value overrides "
                                   "(values parsed as YAML). Run under torchrun for several processes.")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--config", type=Path, help="YAML config file")
    src.add_argument("--preset", help="name of a config in configs/ (e.g. fmnist-unet-deltafm)")
    t.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. optim.lr=2e-4")
    t.add_argument("--out", type=Path, help="run folder (default runs/<config name>)")
    t.add_argument("--resume", metavar="auto|PATH",
                   help="'auto': newest valid checkpoint in OUT/checkpoints (fresh start if none); or a "
                        "checkpoint / run folder")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")

    s = sub.add_parser("sample", help="generate images from a checkpoint",
                       description="Sample from a checkpoint: PNG grid, per-class grids and samples.npz "
                                   "(ADM evaluation layout). Defaults come from the checkpoint's sample section.")
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

    for name, (_, help_) in _DISPATCH.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def _dispatch(name: str, argv: list[str]) -> int:
    module, _ = _DISPATCH[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        print(f"error: `deltafm {name}` is not available ({module}: {e})", file=sys.stderr)
        return 2
    rc = mod.main(argv)
    return int(rc or 0)


def _train_config(args: argparse.Namespace):
    from deltafm.train.checkpoint import load_checkpoint, resolve_checkpoint
    from deltafm.train.config import ConfigError, config_to_dict, find_preset, load_config

    if args.config is not None or args.preset is not None:
        path = args.config if args.config is not None else find_preset(args.preset)
        return load_config(path, args.overrides), Path(path).stem
    if args.resume and args.resume != "auto":
        ckpt = load_checkpoint(resolve_checkpoint(args.resume), weights_only=True)
        if ckpt.config is None:
            raise ConfigError(f"checkpoint {ckpt.path} records no config; pass --config")
        return load_config(None, args.overrides, base=ckpt.config), ckpt.path.parent.parent.name
    if args.resume == "auto" and args.out is not None and (args.out / "config.yaml").is_file():
        base = load_config(args.out / "config.yaml")
        return load_config(None, args.overrides, base=config_to_dict(base)), args.out.name
    raise ConfigError("give --config FILE or --preset NAME (or --resume PATH to reuse a checkpoint's config)")


def _cmd_train(args: argparse.Namespace) -> int:
    from deltafm.train.config import format_config

    cfg, name = _train_config(args)
    if args.dry_run:
        print(format_config(cfg), end="")
        return 0
    from deltafm.train.loop import train

    out = args.out if args.out is not None else Path("runs") / name
    result = train(cfg, out, resume=args.resume)
    return 0 if result.status in ("done", "interrupted") else 1


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
    """Entry point of the ``deltafm`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DISPATCH:
        return _dispatch(argv[0], argv[1:])
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":  # overrides may come before or after the options
        args.overrides = list(args.overrides) + [r for r in rest if "=" in r and not r.startswith("-")]
        rest = [r for r in rest if not ("=" in r and not r.startswith("-"))]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command is None:
        parser.print_help()
        return 0
    from deltafm.train.builders import SetupError
    from deltafm.train.checkpoint import CheckpointError
    from deltafm.train.config import ConfigError
    from deltafm.train.loop import NonFiniteLossError

    try:
        if args.command == "train":
            return _cmd_train(args)
        return _cmd_sample(args)
    except (ConfigError, CheckpointError, SetupError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        if args.command == "sample":
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
