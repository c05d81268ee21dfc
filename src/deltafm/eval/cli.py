"""``deltafm eval``: train the feature classifier, cache reference statistics, score samples.

Subcommands::

    deltafm eval train-classifier --dataset fashion-mnist --epochs 15 --out runs/eval/fmnist-cls.safetensors
    deltafm eval ref-stats --dataset fashion-mnist --split test \\
        --extractor classifier:runs/eval/fmnist-cls.safetensors --out runs/eval/fmnist-test.npz
    deltafm eval eval --samples samples.npz --ref runs/eval/fmnist-test.npz \\
        --extractor classifier:runs/eval/fmnist-cls.safetensors --out metrics.json

Datasets are read with :func:`deltafm.data.load_dataset`, the builder training uses (``--root`` for a
dataset in another folder, ``--image-size`` / ``--channels`` for an image folder). Sample files use the
ADM layout: uint8 images (N, H, W, C) under ``arr_0``; class labels under ``labels`` (or ``arr_1``, as
ADM's sampler writes them) when present. Scoring is :func:`deltafm.eval.features.evaluate_samples`; the
FM-vs-ΔFM study scores with ``--fd-method eigh --splits 1 --pr-max match``. Also runnable as
``python -m deltafm.eval.cli``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["build_parser", "load_samples", "main"]


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--root", default=None, help="data folder (default: the dataset's; needed for mnist, folder)")
    p.add_argument("--image-size", type=int, default=None, help="folder datasets: resize and crop to this size")
    p.add_argument("--channels", type=int, default=None, help="folder datasets: 1 (grayscale) or 3 (RGB)")


def _pr_max(text: str) -> int | str | None:
    """``--pr-max``: a positive integer, ``match`` (as many real rows as samples) or ``none``."""
    if text.lower() in ("none", "null", "all"):
        return None
    if text.lower() == "match":
        return "match"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, 'match' or 'none', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deltafm eval", description="Sample-quality metrics (FD, IS, precision/recall, class accuracy)."
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-classifier", help="train the feature classifier on a training split")
    _add_data_args(t)
    t.add_argument("--epochs", type=int, default=15)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--weight-decay", type=float, default=0.05)
    t.add_argument("--out", required=True, help="output .safetensors path (a .sha256 sidecar is written too)")

    r = sub.add_parser("ref-stats", help="feature statistics of a real split -> .npz")
    _add_data_args(r)
    r.add_argument("--split", default="test")
    r.add_argument("--extractor", required=True, help="classifier:PATH or inception:PATH")
    r.add_argument("--out", required=True)
    r.add_argument("--max-items", type=int, default=None, help="use only the first N items")
    r.add_argument("--no-features", action="store_true", help="store only mu/sigma (no precision/recall)")
    r.add_argument("--batch-size", type=int, default=256)

    e = sub.add_parser("eval", aliases=["score"], help="score a samples .npz against reference statistics")
    e.add_argument("--samples", required=True, help=".npz with uint8 NHWC images under arr_0")
    e.add_argument("--ref", required=True, help="reference statistics .npz from ref-stats")
    e.add_argument("--extractor", required=True, help="classifier:PATH or inception:PATH")
    e.add_argument("--out", default=None, help="write the metrics JSON here")
    e.add_argument("--k", type=int, default=3, help="k of the k-NN manifolds for precision/recall")
    e.add_argument("--splits", type=int, default=10, help="Inception Score splits")
    e.add_argument("--pr-max", type=_pr_max, default=10_000,
                   help="subsample both sets to this many rows for P/R; 'match': as many real rows as samples; "
                        "'none': no subsampling")
    e.add_argument("--pr-seed", type=int, default=0, help="seed of the P/R subsampling")
    e.add_argument("--fd-method", choices=["sqrtm", "eigh"], default="sqrtm",
                   help="matrix square root of the FD: sqrtm (FID convention) or eigh (symmetric, exact for PSD)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--allow-mismatch", action="store_true", help="accept statistics from another extractor")
    return p


def load_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ADM-layout samples: uint8 (N, H, W, C) under ``arr_0``; labels under ``labels`` or ``arr_1``."""
    with np.load(path, allow_pickle=False) as data:
        if "arr_0" not in data.files:
            raise KeyError(f"{path}: no 'arr_0' (has {data.files}); expected ADM layout, uint8 NHWC under arr_0")
        images = data["arr_0"]
        labels = None
        for key in ("labels", "arr_1"):
            if key in data.files:
                labels = data[key].astype(np.int64).reshape(-1)
                break
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{path}: {len(labels)} labels for {len(images)} images")
    return images, labels


def _load(args: argparse.Namespace, split: str):
    from deltafm.data import load_dataset

    return load_dataset(args.dataset, root=args.root, split=split, image_size=args.image_size,
                        channels=args.channels)


def _train_classifier(args: argparse.Namespace) -> dict:
    from deltafm.eval.classifier import save_classifier, train_classifier

    train, test = _load(args, "train"), _load(args, "test")
    model = train_classifier(
        train, epochs=args.epochs, seed=args.seed, dataset_test=test, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, progress=not args.no_progress,
    )
    digest = save_classifier(model, args.out)
    return {
        "out": str(args.out),
        "sha256": digest,
        "dataset": args.dataset,
        "test_accuracy": model.meta.get("test_accuracy"),
        "train_seconds": model.meta.get("train_seconds"),
        "epochs": args.epochs,
        "threads": torch.get_num_threads(),
    }


def _ref_stats(args: argparse.Namespace) -> dict:
    from deltafm.eval.features import get_extractor, reference_statistics
    from deltafm.eval.metrics import save_reference_stats

    data = _load(args, args.split)
    images = data.images if args.max_items is None else data.images[: args.max_items]
    extractor = get_extractor(args.extractor, device=args.device)
    meta = {"dataset": args.dataset, "split": args.split, "extractor_spec": args.extractor}
    if args.root is not None:
        meta["root"] = str(args.root)
    stats = reference_statistics(
        extractor, images, keep_features=not args.no_features, meta=meta,
        batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_reference_stats(args.out, stats.mu, stats.sigma, stats.features, stats.meta)
    return {"out": str(args.out), **stats.meta}


def _eval(args: argparse.Namespace) -> dict:
    from deltafm.eval.features import evaluate_samples, get_extractor
    from deltafm.eval.metrics import load_reference_stats

    images, labels = load_samples(args.samples)
    ref = load_reference_stats(args.ref)
    extractor = get_extractor(args.extractor, device=args.device)
    result = evaluate_samples(
        extractor, images, ref, labels=labels, layout="NHWC", k=args.k, splits=args.splits,
        pr_max=args.pr_max, seed=args.pr_seed, fd_method=args.fd_method, batch_size=args.batch_size,
        device=args.device, progress=not args.no_progress, allow_mismatch=args.allow_mismatch,
    )
    result["samples"] = str(args.samples)
    result["ref"] = str(args.ref)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``deltafm eval``; prints a JSON summary of what it did.

    Returns 0 on success; on bad input (missing file, hash mismatch, wrong layout, statistics from another
    extractor, unknown dataset) prints one ``error:`` line to stderr and returns 2.
    """
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    handler = {"train-classifier": _train_classifier, "ref-stats": _ref_stats, "eval": _eval, "score": _eval}
    try:
        result = handler[args.command](args)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
