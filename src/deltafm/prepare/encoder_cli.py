"""``deltafm train-encoder``: train a small DINOv2-class encoder on an image set, for REPA targets.

    deltafm train-encoder --out runs/encoders/fmnist-dinov2-s            # Fashion-MNIST, 7x7 tokens of 4 px
    deltafm train-encoder --dataset digits --epochs 30 --out runs/encoders/digits-dinov2
    deltafm train-encoder --dataset folder --root IMAGES --grid 8 --patch-size 8 --out runs/encoders/mine

The result is a transformers ``Dinov2Model.save_pretrained`` folder (plus ``preprocessor_config.json``
with the data's mean and std, the classifier head and ``train_encoder.json``), loaded like a real DINOv2
with ``deltafm.encoders.load_encoder(OUT)``. See docs/ENCODERS.md and :mod:`deltafm.prepare.encoder_train`.
This encoder gives REPA's alignment targets only; it is not the network that computes FD or accuracy.

Exit status: 0 when OUT is written; 2 with one ``error:`` line on bad input (nothing written).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from deltafm.errors import INPUT_OS_ERRORS, OneLineParser, run_command

from .encoder_config import EncoderSettings, TrainEncoderError

__all__ = ["build_parser", "settings_from_args", "main"]

_D = EncoderSettings()


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="deltafm train-encoder",
                      description="Train a small transformers Dinov2Model on the class labels of an image set and "
                                  "save it with save_pretrained to OUT (REPA target encoder for deltafm.encoders).")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=_D.dataset, help="fashion-mnist (default), mnist, digits or folder")
    g.add_argument("--root", default=None, help="data folder (default for fashion-mnist: the system copy)")
    g.add_argument("--max-items", type=int, default=None, help="train on the first N training images only")
    g.add_argument("--heldout", type=int, default=_D.heldout,
                   help=f"up to N test-split images for the accuracy (default {_D.heldout})")
    g.add_argument("--shift", type=int, default=_D.shift,
                   help=f"augmentation: random shifts of up to N px each way (default {_D.shift}; 0: none)")
    g.add_argument("--flip", action="store_true",
                   help="augmentation: mirror left-right with probability 1/2 (not for digits; default off)")
    g = p.add_argument_group("model (transformers Dinov2Model)")
    g.add_argument("--grid", type=int, default=_D.grid,
                   help=f"token grid side G; the encoder sees G*P px (default {_D.grid})")
    g.add_argument("--patch-size", type=int, default=_D.patch_size, help=f"patch side P (default {_D.patch_size})")
    g.add_argument("--hidden", type=int, default=_D.hidden, help=f"token width (default {_D.hidden})")
    g.add_argument("--depth", type=int, default=_D.depth, help=f"transformer blocks (default {_D.depth})")
    g.add_argument("--heads", type=int, default=_D.heads, help=f"attention heads (default {_D.heads})")
    g.add_argument("--mlp-ratio", type=int, default=_D.mlp_ratio, help=f"MLP width / hidden (default {_D.mlp_ratio})")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=_D.epochs, help=f"passes over the training images (default "
                                                                   f"{_D.epochs})")
    g.add_argument("--batch-size", type=int, default=_D.batch_size, help=f"images per step (default {_D.batch_size})")
    g.add_argument("--lr", type=float, default=_D.lr, help=f"peak AdamW learning rate (default {_D.lr:g})")
    g.add_argument("--warmup", type=int, default=_D.warmup, help="linear warm-up steps, then cosine decay to 0")
    g.add_argument("--weight-decay", type=float, default=_D.weight_decay,
                   help=f"AdamW weight decay of the matrices (default {_D.weight_decay:g})")
    g.add_argument("--label-smoothing", type=float, default=_D.label_smoothing, help="cross-entropy label smoothing")
    g.add_argument("--grad-clip", type=float, default=_D.grad_clip, help="gradient norm clip (0: off; default 1)")
    g.add_argument("--seed", type=int, default=_D.seed, help="seed of the weights, data order and augmentation")
    g = p.add_argument_group("run")
    g.add_argument("--out", type=Path, required=True, help="output folder (missing or empty)")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    g.add_argument("--device", default=_D.device, help="cpu (default), auto (CUDA if available) or cuda[:N]")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def settings_from_args(args: argparse.Namespace) -> EncoderSettings:
    """The run's settings from parsed arguments."""
    return EncoderSettings(
        dataset=args.dataset, root=str(args.root) if args.root is not None else None, max_items=args.max_items,
        heldout=args.heldout, grid=args.grid, patch_size=args.patch_size, hidden=args.hidden, depth=args.depth,
        heads=args.heads, mlp_ratio=args.mlp_ratio, shift=args.shift, flip=args.flip, epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
        grad_clip=args.grad_clip, seed=args.seed, device=args.device, threads=args.threads,
        progress=not args.no_progress,
    )


def _run(args: argparse.Namespace) -> int:
    import torch

    from .encoder_config import check_settings
    from .encoder_train import train_encoder

    s = settings_from_args(args)
    check_settings(s)
    threads = torch.get_num_threads()
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    try:
        result = train_encoder(s, args.out, overwrite=args.overwrite)
    except INPUT_OS_ERRORS as e:  # a missing data file or folder: bad input, one line
        raise TrainEncoderError(str(e)) from None
    finally:
        torch.set_num_threads(threads)
    acc = result.record["metrics"]["heldout_accuracy"]
    print(f"{result.out} (held-out accuracy {acc:.4f}; load with deltafm.encoders.load_encoder('{result.out}'))")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 done, 2 with one ``error:`` line on bad input."""
    return run_command(_run, build_parser().parse_args(list(argv) if argv is not None else None))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
