"""``deltafm train-autoencoder``: train a small ``diffusers.AutoencoderKL`` on an image dataset.

    deltafm train-autoencoder --out runs/ae-fmnist                       # Fashion-MNIST, 32x32 gray, 4x8x8
    deltafm train-autoencoder --dataset digits --block-channels 16,32 --norm-groups 8 --out runs/ae-digits
    deltafm train-autoencoder --out runs/ae-fmnist --resume auto          # continue after a stop / kill

The result, ``OUT/vae``, is diffusers' own ``save_pretrained`` folder (EMA weights; config.json with the
measured ``scaling_factor``), loaded like SD-VAE with ``deltafm.vae.load_autoencoder(OUT/vae)`` or
``--vae OUT/vae``; ``OUT/autoencoder.json`` records the settings, the data preparation, held-out PSNR and
rFD, the identity and the scale. See docs/LATENTS.md ("deltafm train-autoencoder") for the maths
(:mod:`deltafm.prepare.autoencoder_train`, :mod:`deltafm.prepare.autoencoder_eval`) and measured numbers.

Exit status: 0 when OUT/vae is written (or was already); 2 with one ``error:`` line on bad input (nothing
written); 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM) when stopped by a signal, after
writing a checkpoint to continue from with ``--resume auto``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from deltafm.errors import CLI_ERRORS, cli_error

from .autoencoder_config import FITS, AutoencoderSettings

__all__ = ["build_parser", "settings_from_args", "main"]

_D = AutoencoderSettings()


def _channels_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 32,64,64, got {text!r}") from None
    return values


def _data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=_D.dataset, help="fashion-mnist (default), mnist, digits or folder")
    g.add_argument("--root", default=None, help="data folder (default for fashion-mnist: the system copy)")
    g.add_argument("--max-items", type=int, default=None, help="train on the first N training images only")
    g.add_argument("--heldout", type=int, default=_D.heldout,
                   help=f"up to N test-split images for PSNR / rFD (default {_D.heldout})")
    g.add_argument("--image-size", type=int, default=None,
                   help="model image size S, a multiple of the downsampling factor f (default: the dataset's side "
                        "rounded up to a multiple of 2f, an even latent side: Fashion-MNIST 28 -> 32)")
    g.add_argument("--fit", choices=list(FITS), default=_D.fit,
                   help="reach S by centred edge-replicate padding (default; crops back exactly), bilinear resize, "
                        "or adm: the centre crop of deltafm prepare-latents (BICUBIC)")
    g.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="image channels (default: the dataset's; 3 on gray data replicates the gray channel)")


def _model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (diffusers AutoencoderKL)")
    g.add_argument("--block-channels", type=_channels_list, default=_D.block_channels,
                   help="channels per level; L levels downsample by 2^(L-1) (default 16,32,32: 32x32 -> 8x8)")
    g.add_argument("--latent-channels", type=int, default=_D.latent_channels,
                   help=f"latent channels (default {_D.latent_channels})")
    g.add_argument("--layers-per-block", type=int, default=_D.layers_per_block, help="ResNet blocks per level")
    g.add_argument("--norm-groups", type=int, default=_D.norm_groups,
                   help=f"GroupNorm groups, dividing every level (default {_D.norm_groups})")
    g.add_argument("--mid-attention", action="store_true", help="self-attention in the middle block (as SD-VAE)")


def _train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("loss and optimisation")
    g.add_argument("--l1", type=float, default=_D.l1, help=f"weight of mean |x̂ - x| (default {_D.l1:g})")
    g.add_argument("--mse", type=float, default=_D.mse, help=f"weight of mean (x̂ - x)^2 (default {_D.mse:g})")
    g.add_argument("--kl-weight", type=float, default=_D.kl_weight,
                   help=f"β on the per-element mean KL(q(z|x) || N(0, I)) (default {_D.kl_weight:g})")
    g.add_argument("--steps", type=int, default=_D.steps, help=f"optimizer steps (default {_D.steps})")
    g.add_argument("--batch-size", type=int, default=_D.batch_size, help=f"images per step (default {_D.batch_size})")
    g.add_argument("--lr", type=float, default=_D.lr, help=f"peak AdamW learning rate (default {_D.lr})")
    g.add_argument("--warmup", type=int, default=_D.warmup, help="linear warm-up steps, then cosine decay to 0")
    g.add_argument("--weight-decay", type=float, default=_D.weight_decay, help="AdamW weight decay (default 0)")
    g.add_argument("--grad-clip", type=float, default=_D.grad_clip, help="gradient norm clip (0: off; default 1)")
    g.add_argument("--ema-halflife", type=float, default=_D.ema_halflife,
                   help=f"EMA half-life in images (default {_D.ema_halflife:g}; 0: the EMA is the live weights)")
    g.add_argument("--ema-rampup", type=float, default=_D.ema_rampup,
                   help="cap the half-life at this fraction of the images seen (default 0.1; 0: no cap)")
    g.add_argument("--seed", type=int, default=_D.seed, help="seed of the weights, data order and posterior draws")


def _run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--out", type=Path, required=True, help="run folder (OUT/vae is the result)")
    g.add_argument("--resume", choices=["auto"], default=None,
                   help="continue from the newest valid checkpoint in OUT (a finished run is left as it is)")
    g.add_argument("--checkpoint-every", type=int, default=_D.checkpoint_every, help="steps between checkpoints")
    g.add_argument("--keep-last", type=int, default=_D.keep_last, help="checkpoints kept (default 2)")
    g.add_argument("--grid-every", type=int, default=_D.grid_every,
                   help="steps between held-out PSNR checks and recon grids (OUT/samples)")
    g.add_argument("--log-every", type=int, default=_D.log_every, help="steps per log record in metrics.json")
    g.add_argument("--scale-items", type=int, default=_D.scale_items,
                   help="training images whose latents set scaling_factor = 1/std (default 5000)")
    g.add_argument("--shift", action="store_true", help="also set shift_factor = the latents' mean (default None)")
    g.add_argument("--extractor", default=None, metavar="classifier:PATH|inception:PATH",
                   help="features for rFD (default: 8x8 average-pooled pixels, see docs/LATENTS.md)")
    g.add_argument("--device", default=_D.device, help="auto (default: CUDA if available), cpu or cuda[:N]")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltafm train-autoencoder",
                                description="Train a small diffusers AutoencoderKL (KL-regularised, L1 + MSE "
                                            "reconstruction, EMA) and save it with save_pretrained to OUT/vae.")
    _data_options(p)
    _model_options(p)
    _train_options(p)
    _run_options(p)
    return p


def settings_from_args(args: argparse.Namespace) -> AutoencoderSettings:
    """The run's settings from parsed arguments."""
    return AutoencoderSettings(
        dataset=args.dataset, root=str(args.root) if args.root is not None else None, max_items=args.max_items,
        heldout=args.heldout, image_size=args.image_size, fit=args.fit, channels=args.channels,
        block_channels=tuple(args.block_channels), latent_channels=args.latent_channels,
        layers_per_block=args.layers_per_block, norm_groups=args.norm_groups, mid_attention=args.mid_attention,
        l1=args.l1, mse=args.mse, kl_weight=args.kl_weight, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        ema_halflife=args.ema_halflife, ema_rampup=args.ema_rampup, seed=args.seed,
        checkpoint_every=args.checkpoint_every, keep_last=args.keep_last, grid_every=args.grid_every,
        log_every=args.log_every, scale_items=args.scale_items, shift=args.shift, extractor=args.extractor,
        device=args.device, threads=args.threads, progress=not args.no_progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 done, 2 bad input, 128 + signal when stopped (a checkpoint was written)."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    threads = torch.get_num_threads()
    try:
        from .autoencoder_run import train_autoencoder

        s = settings_from_args(args)
        if s.threads is not None and s.threads >= 1:
            torch.set_num_threads(s.threads)
        result = train_autoencoder(s, args.out, resume=args.resume)
    except CLI_ERRORS as e:
        print(cli_error(e), file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    if result.status == "interrupted":
        return 128 + int(result.signum or 15)
    print(f"{result.out / 'vae'} (load with deltafm.vae.load_autoencoder or --vae {result.out / 'vae'})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
