"""``deltafm eval``: train the feature classifier, cache reference statistics, score samples.

Subcommands::

    deltafm eval train-classifier --dataset fashion-mnist --epochs 15 --out runs/eval/fmnist-cls.safetensors
    deltafm eval ref-stats --dataset fashion-mnist --split test \\
        --extractor classifier:runs/eval/fmnist-cls.safetensors --out runs/eval/fmnist-test.npz
    deltafm eval eval --samples samples.npz --ref runs/eval/fmnist-test.npz \\
        --extractor classifier:runs/eval/fmnist-cls.safetensors --out metrics.json
    deltafm eval convert-inception --in pt_inception-2015-12-05-6726825d.pth --out fid-inception.safetensors
    deltafm eval ref-stats --root IMAGES/ --image-size 256 --extractor inception:fid-inception.safetensors \
        --out my-ref.npz                       # an ADM-style reference batch of your own images
    deltafm eval eval --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \
        --extractor inception:fid-inception.safetensors   # FID, sFID, IS, precision/recall as ADM

Datasets are read with :func:`deltafm.data.load_dataset`, the builder training uses (``--root`` for a
dataset in another folder, ``--image-size`` / ``--channels`` for an image folder). Sample files use the
ADM layout: uint8 images (N, H, W, C) under ``arr_0``; class labels under ``labels`` (or ``arr_1``, as
ADM's sampler writes them) when present. Scoring is :func:`deltafm.eval.features.evaluate_samples`; the
FM-vs-ΔFM study scores with ``--fd-method eigh --splits 1 --pr-max match``. ``--ref`` may be an ADM
reference batch (:mod:`deltafm.eval.adm`); with an Inception extractor the defaults follow the ADM
evaluator (``--protocol adm``: IS over chunks of 5000 samples, precision/recall against all reference
images and all samples). Also runnable as ``python -m deltafm.eval.cli``.

Bad input (a missing, garbage or pickled file, a wrong layout, labels outside the classifier's classes,
statistics from another extractor, an option out of range) prints one ``error:`` line and exits with 2;
any other exception is a bug and shows its traceback.
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

from deltafm.errors import CLI_ERRORS, cli_error
from deltafm.eval.metrics import EvalInputError, EvalKeyError, open_npz, read_npz_array

__all__ = ["build_parser", "load_samples", "main", "resolve_device"]

SAMPLES_FORMAT = ("{option} must be an .npz (ADM layout) with arr_0 uint8 (N, H, W, C), C = 1 or 3, and optional "
                  "integer labels under 'labels' or 'arr_1'; it is read with allow_pickle=False (never unpickled)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=None,
                   help="dataset name (default: 'folder' when --root is given to ref-stats, else fashion-mnist)")
    p.add_argument("--root", default=None, help="data folder (default: the dataset's; needed for mnist, folder)")
    p.add_argument("--image-size", type=int, default=None, help="folder datasets: resize and crop to this size")
    p.add_argument("--channels", type=int, default=None, help="folder datasets: 1 (grayscale) or 3 (RGB)")


#: Default of options whose value the ``--protocol`` decides (not a string: argparse would parse it).
_PROTOCOL_DEFAULT = object()


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
    t.add_argument("--widths", type=int, nargs=3, default=[32, 64, 128], metavar="W",
                   help="channels of the three conv stages (a second, independent feature network: e.g. 48 96 192 "
                        "with another --seed)")
    t.add_argument("--out", required=True, help="output .safetensors path (a .sha256 sidecar is written too)")

    r = sub.add_parser("ref-stats", help="feature statistics of a real split -> .npz")
    _add_data_args(r)
    r.add_argument("--split", default="test")
    r.add_argument("--extractor", required=True, help="classifier:PATH or inception:PATH")
    r.add_argument("--out", required=True)
    r.add_argument("--max-items", type=int, default=None, help="use only the first N items")
    r.add_argument("--no-features", action="store_true", help="store only mu/sigma (no precision/recall)")
    r.add_argument("--save-images", action="store_true",
                   help="also store the images under arr_0 (uint8 NHWC): a complete ADM reference batch")
    r.add_argument("--batch-size", type=int, default=256)

    e = sub.add_parser("eval", aliases=["score"], help="score a samples .npz against reference statistics")
    e.add_argument("--samples", required=True, help=".npz with uint8 NHWC images under arr_0")
    e.add_argument("--ref", required=True, help="reference statistics .npz from ref-stats")
    e.add_argument("--extractor", required=True, help="classifier:PATH or inception:PATH")
    e.add_argument("--out", default=None, help="write the metrics JSON here")
    e.add_argument("--protocol", choices=["auto", "adm", "deltafm"], default="auto",
                   help="defaults of --splits/--is-split-size/--pr-max: adm (IS over chunks of 5000 samples, "
                        "P/R without subsampling, as the ADM evaluator) or deltafm (10 IS splits, P/R on at most "
                        "10000 rows); auto: adm for inception extractors, deltafm for classifiers")
    e.add_argument("--k", type=int, default=3, help="k of the k-NN manifolds for precision/recall")
    e.add_argument("--splits", type=int, default=None, help="Inception Score: this many equal chunks")
    e.add_argument("--is-split-size", type=int, default=None,
                   help="Inception Score: chunks of this many consecutive samples (ADM: 5000)")
    e.add_argument("--pr-max", type=_pr_max, default=_PROTOCOL_DEFAULT,
                   help="subsample both sets to this many rows for P/R; 'match': as many real rows as samples; "
                        "'none': no subsampling (default: the protocol's)")
    e.add_argument("--pr-seed", type=int, default=0, help="seed of the P/R and KID subsampling")
    e.add_argument("--kid-subsets", type=int, default=100, help="KID: random subsets averaged (0: no KID)")
    e.add_argument("--kid-subset-size", type=int, default=1000, help="KID: rows per subset (at most N)")
    e.add_argument("--fd-method", choices=["auto", "sqrtm", "eigh", "lowrank"], default="auto",
                   help="matrix square root of the FD: sqrtm (FID convention), eigh (symmetric, exact for PSD), "
                        "lowrank (exact, through the samples' N x N Gram matrix); auto: sqrtm when there are more "
                        "samples than feature dimensions, else lowrank")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--allow-mismatch", action="store_true",
                   help="accept statistics from another extractor, and samples of another size than the classifier's")

    c = sub.add_parser("convert-inception", help="convert FID Inception weights (.pth) once to safetensors")
    c.add_argument("--in", dest="src", required=True, help="torch.save state dict (read with weights_only=True)")
    c.add_argument("--out", required=True, help="output .safetensors")
    return p


def load_samples(path: str | Path, option: str = "--samples") -> tuple[np.ndarray, np.ndarray | None]:
    """Read ADM-layout samples: uint8 (N, H, W, C) under ``arr_0``; labels under ``labels`` or ``arr_1``.
    ``option`` names the command-line option the file came from, in the error messages.

    Raises FileNotFoundError, :class:`EvalKeyError` (no ``arr_0``) or :class:`EvalInputError` (not an .npz,
    pickled arrays, another dtype or layout, non-integer or negative labels, a label count that differs).
    """
    fmt = SAMPLES_FORMAT.format(option=option)
    with open_npz(path, fmt) as data:
        if "arr_0" not in data.files:
            raise EvalKeyError(f"{path}: no 'arr_0' (has {data.files}); {fmt}")
        images = read_npz_array(data, "arr_0", path, fmt)
        labels = None
        for key in ("labels", "arr_1"):
            if key in data.files:
                labels = read_npz_array(data, key, path, fmt)
                break
    if images.dtype != np.uint8 or images.ndim != 4:
        raise EvalInputError(f"{path}: arr_0 is {images.dtype} {images.shape}; {fmt}")
    if images.shape[3] not in (1, 3):
        hint = "; it looks like (N, C, H, W): transpose it to (N, H, W, C)" if images.shape[1] in (1, 3) else ""
        raise EvalInputError(f"{path}: arr_0 {images.shape} has {images.shape[3]} channels in its last axis{hint}; "
                             f"{fmt}")
    if labels is not None:
        if labels.dtype.kind not in "iu":
            raise EvalInputError(f"{path}: labels must be integers, got {labels.dtype}; {fmt}")
        labels = labels.astype(np.int64).reshape(-1)
        if len(labels) != len(images):
            raise EvalInputError(f"{path}: {len(labels)} labels for {len(images)} images")
        if len(labels) and labels.min() < 0:
            raise EvalInputError(f"{path}: labels must be class ids >= 0, got {int(labels.min())}")
    return images, labels


def resolve_device(text: str) -> str:
    """``auto`` (cuda when available, else cpu), ``cpu`` or ``cuda[:N]`` of a GPU that exists; else an
    :class:`EvalInputError`."""
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise EvalInputError(f"--device must be auto, cpu or cuda[:N], got {text!r}") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index is not None and dev.index >= n):
            raise EvalInputError(f"--device {text}: no such GPU here ({n} visible); use --device cpu")
    elif dev.type != "cpu":
        raise EvalInputError(f"--device must be auto, cpu or cuda[:N], got {text!r}")
    return text


def _positive(**values: int | float | None) -> None:
    """Each named option must be > 0 (None: not given)."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise EvalInputError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def _out_file(path: str | Path) -> Path:
    """An output file path that is not an existing folder."""
    path = Path(path)
    if path.is_dir():
        raise EvalInputError(f"--out {path} is a folder; give a file path")
    return path


def _load(args: argparse.Namespace, split: str):
    from deltafm.data import load_dataset

    if args.dataset is None:
        args.dataset = "fashion-mnist"
    try:
        return load_dataset(args.dataset, root=args.root, split=split, image_size=args.image_size,
                            channels=args.channels)
    except CLI_ERRORS:
        raise
    except (ValueError, OSError) as e:  # the data modules' own checks (e.g. ImageDataset's) name the problem
        raise EvalInputError(f"cannot load dataset {args.dataset!r} (root {args.root}): {e}") from None


def _train_classifier(args: argparse.Namespace) -> dict:
    from deltafm.eval.classifier import save_classifier, train_classifier

    _positive(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, widths=min(args.widths))
    if args.weight_decay < 0:
        raise EvalInputError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    out = _out_file(args.out)
    train, test = _load(args, "train"), _load(args, "test")
    if train.kind != "images":
        raise EvalInputError(f"dataset {args.dataset!r} holds {train.kind}, not images; the classifier needs images")
    if args.batch_size > len(train):
        raise EvalInputError(f"--batch-size {args.batch_size} is larger than the training split ({len(train)} images)")
    model = train_classifier(
        train, epochs=args.epochs, seed=args.seed, dataset_test=test, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, progress=not args.no_progress, widths=tuple(args.widths),
    )
    digest = save_classifier(model, out)
    return {
        "out": str(out),
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

    _positive(max_items=args.max_items, batch_size=args.batch_size)
    out = _out_file(args.out)
    if args.dataset is None:
        args.dataset = "folder" if args.root is not None else "fashion-mnist"
    extractor = get_extractor(args.extractor, device=args.device)
    data = _load(args, args.split)
    if data.kind != "images":
        raise EvalInputError(f"dataset {args.dataset!r} holds {data.kind}, not images")
    images = data.images if args.max_items is None else data.images[: args.max_items]
    meta = {"dataset": args.dataset, "split": args.split, "extractor_spec": args.extractor,
            "image_hw": [int(images.shape[-2]), int(images.shape[-1])]}
    if args.root is not None:
        meta["root"] = str(args.root)
    stats = reference_statistics(
        extractor, images, keep_features=not args.no_features, meta=meta,
        batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    nhwc = None
    if args.save_images:
        nhwc = np.asarray(images.cpu() if isinstance(images, torch.Tensor) else images)
        nhwc = (nhwc[:, :, :, None] if nhwc.ndim == 3 else nhwc.transpose(0, 2, 3, 1)).astype(np.uint8)
    save_reference_stats(out, stats.mu, stats.sigma, stats.features, stats.meta, mu_s=stats.mu_s,
                         sigma_s=stats.sigma_s, images=nhwc)
    return {"out": str(out), "sfid_stats": stats.mu_s is not None, "images_saved": nhwc is not None, **stats.meta}


#: Scoring defaults of each ``--protocol``.
PROTOCOLS = {
    # openai/guided-diffusion evaluations/evaluator.py: IS over consecutive chunks of 5000 samples; precision
    # and recall between all reference-batch images and all samples (no subsampling), k = 3; FID by sqrtm.
    "adm": {"splits": None, "is_split_size": 5000, "pr_max": None},
    # the project's defaults for its own classifier (docs/EVAL.md).
    "deltafm": {"splits": 10, "is_split_size": None, "pr_max": 10_000},
}


def _protocol(args: argparse.Namespace) -> tuple[str, dict]:
    """The protocol name and the scoring options it resolves to (explicit options win)."""
    name = args.protocol
    if name == "auto":
        name = "adm" if args.extractor.startswith("inception:") else "deltafm"
    opts = dict(PROTOCOLS[name])
    if args.splits is not None or args.is_split_size is not None:
        if args.splits is not None and args.is_split_size is not None:
            raise EvalInputError("give --splits or --is-split-size, not both")
        opts["splits"], opts["is_split_size"] = args.splits, args.is_split_size
    if args.pr_max is not _PROTOCOL_DEFAULT:
        opts["pr_max"] = args.pr_max
    return name, opts


def _eval(args: argparse.Namespace) -> dict:
    from deltafm.eval.adm import inspect_reference, load_reference
    from deltafm.eval.features import evaluate_samples, get_extractor
    from deltafm.eval.metrics import load_reference_stats

    _positive(k=args.k, splits=args.splits, is_split_size=args.is_split_size, batch_size=args.batch_size)
    if args.kid_subsets < 0 or args.kid_subset_size < 2:
        raise EvalInputError(f"--kid-subsets must be >= 0 (0: no KID) and --kid-subset-size >= 2, got "
                             f"{args.kid_subsets} and {args.kid_subset_size}")
    protocol, opts = _protocol(args)
    out = _out_file(args.out) if args.out else None
    images, labels = load_samples(args.samples)
    info = inspect_reference(args.ref, sample_hw=images.shape[1:3], allow_mismatch=args.allow_mismatch)
    if info.has_stats:
        load_reference_stats(args.ref)  # bad statistics fail here, before any network runs
    extractor = get_extractor(args.extractor, device=args.device)
    ref = load_reference(args.ref, extractor, allow_mismatch=args.allow_mismatch, batch_size=args.batch_size,
                         device=args.device, progress=not args.no_progress, info=info)
    result = evaluate_samples(
        extractor, images, ref, labels=labels, layout="NHWC", k=args.k, splits=opts["splits"] or 10,
        is_split_size=opts["is_split_size"], pr_max=opts["pr_max"], seed=args.pr_seed, fd_method=args.fd_method,
        batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
        allow_mismatch=args.allow_mismatch, pr_device=args.device, kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
    )
    result["protocol"] = protocol
    result["samples"] = str(args.samples)
    result["ref"] = str(args.ref)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _convert_inception(args: argparse.Namespace) -> dict:
    from deltafm.eval.inception import convert_inception

    out = _out_file(args.out)
    return {"in": str(args.src), "out": str(out), "sha256": convert_inception(args.src, out)}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``deltafm eval``; prints a JSON summary of what it did.

    Returns 0 on success; on bad input (missing, garbage or pickled file, hash mismatch, wrong layout,
    labels out of range, statistics from another extractor, unknown dataset, option out of range) prints
    one ``error:`` line to stderr and returns 2. Other exceptions (bugs) propagate with their traceback.
    """
    args = build_parser().parse_args(argv)
    handler = {"train-classifier": _train_classifier, "ref-stats": _ref_stats, "eval": _eval, "score": _eval,
               "convert-inception": _convert_inception}
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        if args.threads is not None:
            _positive(threads=args.threads)
            torch.set_num_threads(args.threads)
        args.device = resolve_device(args.device)
        result = handler[args.command](args)
    except CLI_ERRORS as e:
        print(cli_error(e), file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
