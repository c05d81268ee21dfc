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
import re
import sys
from pathlib import Path

from deltafm.errors import CLI_ERRORS, UserError, cli_error

__all__ = ["main", "build_parser", "run_name"]


class UsageError(UserError, ValueError):
    """A command-line argument cannot be used as given (the message says what to pass instead)."""


_DISPATCH = {
    "sample": ("deltafm.sample_cli", "generate images from a checkpoint"),
    "toy": ("deltafm.toy.cli", "2-D toy study: FM vs ΔFM velocity fields and metrics"),
    "eval": ("deltafm.eval.cli", "evaluate samples: classifier FD, class accuracy"),
    "compare": ("deltafm.study.cli", "FM vs ΔFM side by side: train, sample, evaluate, report"),
    "convert": ("deltafm.convert.cli", "public SiT / REPA / ΔFM-reference .pt -> deltafm checkpoint"),
    "mean-target": ("deltafm.convert.mean_target", "estimate the mean target ū of a checkpoint from data"),
    "train-autoencoder": ("deltafm.prepare.autoencoder_cli", "train a small diffusers AutoencoderKL on an image set"),
    "prepare-latents": ("deltafm.prepare.latents_cli", "images (folder / tar shards) -> VAE latent shards"),
    "train-encoder": ("deltafm.prepare.encoder_cli",
                      "train a small DINOv2-class encoder on an image set (REPA targets)"),
    "attributes": ("deltafm.eval.attributes_cli",
                   "shapes set: train the attribute reader, score samples against their prompts"),
    "clip-score": ("deltafm.eval.clip_score_cli", "CLIP-score of samples against their prompts (local CLIP weights)"),
}


def build_parser() -> argparse.ArgumentParser:
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
                   help="'auto': newest valid checkpoint in OUT/checkpoints (fresh start if there is none; an "
                        "error if every one is damaged); or a checkpoint / run folder")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")

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
    try:
        rc = mod.main(argv)
    except UserError as e:  # a subcommand's own handler normally prints these; this is the safety net
        print(cli_error(e), file=sys.stderr)
        return 2
    return int(rc or 0)


def run_name(text: str, source: str) -> str:
    """A run folder name from a config file's stem or a checkpoint's run folder: characters other than
    letters, digits and ``._+-`` become ``-``, leading/trailing dots and dashes are dropped (so ``...yaml``
    never names ``runs/..``); nothing left is a :class:`UsageError` asking for ``--out``."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip(".-")
    if not name:
        raise UsageError(f"cannot name the run folder after {source}; pass --out DIR")
    return name


def _check_out(out: Path) -> None:
    """``--out`` must be a folder or not exist yet, and no part of it may be a file."""
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            what = "--out" if p == out else f"--out {out}: its parent"
            raise UsageError(f"{what} {p} is a file, not a folder; give a run folder")


def _train_config(args: argparse.Namespace):
    from deltafm.train.checkpoint import load_checkpoint, resolve_checkpoint
    from deltafm.train.config import ConfigError, config_to_dict, find_preset, load_config

    if args.config is not None or args.preset is not None:
        path = args.config if args.config is not None else find_preset(args.preset)
        return load_config(path, args.overrides), Path(path).stem, f"the config file name {str(path)!r}"
    if args.resume and args.resume != "auto":
        ckpt = load_checkpoint(resolve_checkpoint(args.resume), weights_only=True)
        if ckpt.config is None:
            raise ConfigError(f"checkpoint {ckpt.path} records no config; pass --config")
        run = ckpt.path.parent.parent
        source = f"the checkpoint's run folder {str(run)!r}"
        return load_config(None, args.overrides, base=ckpt.config), run.name, source
    if args.resume == "auto" and args.out is not None and (args.out / "config.yaml").is_file():
        base = load_config(args.out / "config.yaml")
        return load_config(None, args.overrides, base=config_to_dict(base)), args.out.name, f"--out {args.out}"
    raise ConfigError("give --config FILE or --preset NAME (or --resume PATH to reuse a checkpoint's config)")


def _cmd_train(args: argparse.Namespace) -> int:
    from deltafm.train.config import format_config

    if args.out is not None:
        _check_out(args.out)
    cfg, name, source = _train_config(args)
    if args.dry_run:
        print(format_config(cfg), end="")
        return 0
    from deltafm.train.loop import train

    out = args.out if args.out is not None else Path("runs") / run_name(name, source)
    _check_out(out)
    result = train(cfg, out, resume=args.resume)
    return 0 if result.status in ("done", "interrupted") else 1


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
    try:
        return _cmd_train(args)
    except CLI_ERRORS as e:
        print(cli_error(e), file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
