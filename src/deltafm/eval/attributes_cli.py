"""Command line of the attribute reader: ``train`` one, ``score`` generated samples with it.

    attributes train --out PATH [--scenes N] [--epochs E] [--seed S] [--canvas 32] [--threads 1]
    attributes score --reader PATH --images NPZ (--captions FILE | --factors colour,shape) [--out JSON]

``--images`` is a samples file in the ADM layout (``arr_0`` uint8 (N, H, W, C), as ``deltafm sample`` writes;
labels under ``labels``). ``--captions``: one prompt per line, or a JSON list of strings (or an object with a
``captions`` or ``prompts`` list), in the order of the images: prompt scores
(:func:`~deltafm.eval.attributes_score.score_prompts`). ``--factors``: single-object samples whose labels are
combined class ids of these factors (row-major, as :meth:`~deltafm.data.shapes.SingleObjects.class_ids`):
per-condition accuracy (:func:`~deltafm.eval.attributes_score.score_single_objects`). Both add ``fd``, the
Fréchet distance in the reader's feature space to ``--fd-scenes`` real scenes (0: none).

Bad input prints one ``error:`` line and returns 2; a JSON summary goes to stdout (and to ``--out``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deltafm.data.shapes import ShapesConfig
from deltafm.errors import OneLineParser, run_json_command
from deltafm.eval.attributes import load_reader, save_reader
from deltafm.eval.metrics import EvalInputError

__all__ = ["build_parser", "main", "read_captions"]


def build_parser(prog: str = "deltafm attributes") -> OneLineParser:
    p = OneLineParser(prog=prog, description="Attribute reader: GenEval-like scores on the coloured-shapes set.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    t = sub.add_parser("train", help="train a reader on generated scenes and save it (.safetensors + .sha256)")
    t.add_argument("--out", required=True, help="weights file to write (.safetensors)")
    t.add_argument("--scenes", type=int, default=50_000, help="training scenes (split 'all')")
    t.add_argument("--epochs", type=int, default=4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--canvas", type=int, default=32)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--eval-scenes", type=int, default=2000, help="held-out scenes per evaluation split")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--no-progress", action="store_true")
    s = sub.add_parser("score", help="score generated samples against their prompts or class labels")
    s.add_argument("--reader", required=True, help="reader weights (.safetensors with its .sha256 sidecar)")
    s.add_argument("--images", required=True, help="samples .npz (arr_0 uint8 (N, H, W, C), labels)")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--captions", help="prompts: one per line, or a JSON list")
    what.add_argument("--factors", help="single objects: the factors the labels combine, e.g. colour,shape")
    s.add_argument("--threshold", type=float, default=0.5, help="objectness probability for a read object")
    s.add_argument("--fd-scenes", type=int, default=10_000, help="real scenes for the FD reference (0: no FD)")
    s.add_argument("--fd-seed", type=int, default=1)
    s.add_argument("--out", help="also write the JSON summary here")
    s.add_argument("--threads", type=int, default=1)
    return p


def read_captions(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line; blank lines at the end dropped) or a JSON list of strings (or an
    object holding one under ``captions`` or ``prompts``)."""
    path = Path(path)
    if path.is_dir():
        raise EvalInputError(f"--captions {path} is a folder; give a text file (one prompt per line) or JSON")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise EvalInputError(f"{path}: not JSON ({err})") from None
        if isinstance(data, dict):
            data = data.get("captions", data.get("prompts"))
        if not isinstance(data, list) or not all(isinstance(c, str) for c in data):
            raise EvalInputError(f"{path}: expected a JSON list of strings (or {{\"captions\": [...]}})")
        return data
    return text.rstrip("\n").split("\n") if text.strip() else []


def _positive(**values: int) -> None:
    for name, v in values.items():
        if v < 1:
            raise EvalInputError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def _train(args: Any) -> dict[str, Any]:
    from deltafm.eval.attributes_train import ReaderRecipe, train_reader

    _positive(scenes=args.scenes, epochs=args.epochs, batch_size=args.batch_size)
    if args.eval_scenes < 0:
        raise EvalInputError(f"--eval-scenes must be >= 0, got {args.eval_scenes}")
    out = Path(args.out)
    if out.is_dir():
        raise EvalInputError(f"--out {out} is a folder; name the .safetensors file to write")
    try:
        config = ShapesConfig(canvas=args.canvas)
    except ValueError as err:
        raise EvalInputError(f"--canvas {args.canvas}: {err}") from None
    recipe = ReaderRecipe(scenes=args.scenes, epochs=args.epochs, seed=args.seed, batch_size=args.batch_size)
    reader = train_reader(recipe, config, progress=not args.no_progress, evaluate=args.eval_scenes)
    digest = save_reader(reader, out)
    return {"out": str(out), "sha256": digest, "size_bytes": out.stat().st_size,
            **{k: reader.meta[k] for k in ("train_seconds", "parameters", "heldout") if k in reader.meta}}


def _split_labels(labels: np.ndarray, factors: Sequence[str], config: ShapesConfig) -> dict[str, np.ndarray]:
    """Per-factor ids from combined class ids (the inverse of ``SingleObjects.class_ids``)."""
    sizes = [len(config.vocab(f)) for f in factors]
    total = int(np.prod(sizes))
    if len(labels) and (labels.min() < 0 or labels.max() >= total):
        raise EvalInputError(f"labels must lie in 0..{total - 1} (the classes of {','.join(factors)}), got "
                             f"{int(labels.min())}..{int(labels.max())}")
    out, rest = {}, labels.astype(np.int64)
    for f, k in reversed(list(zip(factors, sizes))):
        out[f], rest = rest % k, rest // k
    return {f: out[f] for f in factors}


def _score(args: Any) -> dict[str, Any]:
    from deltafm.eval.attributes_score import (
        reader_fd,
        scene_reference_statistics,
        score_prompts,
        score_single_objects,
    )
    from deltafm.eval.cli import load_samples

    if args.fd_scenes < 0 or args.fd_scenes == 1:
        raise EvalInputError(f"--fd-scenes must be 0 (no FD) or >= 2, got {args.fd_scenes}")
    reader = load_reader(args.reader)
    config = ShapesConfig(canvas=reader.config.canvas, shapes=reader.config.shapes, colours=reader.config.colours,
                          size_px=reader.config.size_px, gap_px=reader.config.gap_px)
    images, labels = load_samples(args.images, "--images")
    images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    if args.captions is not None:
        result = score_prompts(reader, images, read_captions(args.captions), config, args.threshold)
    else:
        factors = [f.strip() for f in args.factors.split(",") if f.strip()]
        try:
            [config.vocab(f) for f in factors]
        except ValueError as err:
            raise EvalInputError(f"--factors: {err}") from None
        if labels is None or len(set(factors)) != len(factors) or not factors:
            raise EvalInputError("--factors needs distinct factor names and labels in the samples file")
        result = score_single_objects(reader, images, _split_labels(labels, factors, config), config,
                                      args.threshold)
    if args.fd_scenes:
        ref = scene_reference_statistics(reader, args.fd_scenes, args.fd_seed, "all", config)
        result["fd"], result["fd_reference"] = reader_fd(reader, images, ref), ref.meta
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (module docstring); returns 0, or 2 after one ``error:`` line on bad input."""
    args = build_parser().parse_args(argv)
    out = args.out if args.command == "score" else None
    return run_json_command(lambda: (_train if args.command == "train" else _score)(args), args.threads, out)


if __name__ == "__main__":
    sys.exit(main())
