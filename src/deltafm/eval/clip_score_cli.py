"""``deltafm clip-score``: CLIP-score of generated images against their prompts (:mod:`deltafm.eval.clip_score`).

    deltafm clip-score --clip DIR --images runs/samples/samples.npz [--captions FILE] [--out JSON]

``--images`` is a samples file in the ADM layout (``arr_0`` uint8 (N, H, W, C)). The prompts are, by
default, those ``deltafm sample --prompt/--prompts`` recorded: ``sample.json`` beside the file (its
``prompts``) indexed by the file's ``prompt_ids``; or ``--captions FILE`` (one prompt per line, or a JSON
list, in the order of the images). ``--clip`` is a local folder with a whole ``CLIPModel`` and its
processor (nothing is downloaded). Prints (and with ``--out`` writes) a JSON summary: mean CLIP-score, sd,
standard error, N, the CLIP folder's identity, and the mean per prompt.

Bad input prints one ``error:`` line and returns 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deltafm.errors import OneLineParser, run_json_command
from deltafm.eval.metrics import EvalInputError

__all__ = ["build_parser", "main", "prompts_of_samples"]


def build_parser(prog: str = "deltafm clip-score") -> OneLineParser:
    p = OneLineParser(prog=prog, description="CLIP-score of samples against their prompts (local CLIP weights).")
    p.add_argument("--clip", required=True, help="folder with a CLIPModel and its processor (save_pretrained)")
    p.add_argument("--images", required=True, help="samples .npz (arr_0 uint8 (N, H, W, C)), e.g. deltafm sample's")
    p.add_argument("--captions", help="prompts, one per image (default: sample.json beside --images and the "
                                      "file's prompt_ids)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="also write the JSON summary here")
    return p


def prompts_of_samples(images_path: str | Path, n: int) -> list[str]:
    """The prompt of each of the ``n`` images of a ``deltafm sample`` output: ``sample.json``'s ``prompts``
    beside the file, indexed by the file's ``prompt_ids``."""
    from deltafm.eval.metrics import open_npz, read_npz_array
    from deltafm.hub import read_json

    images_path = Path(images_path)
    meta_path = images_path.with_name("sample.json")
    fix = "pass --captions FILE (one prompt per image)"
    if not meta_path.is_file():
        raise EvalInputError(f"no sample.json beside {images_path}; {fix}")
    meta = read_json(meta_path, EvalInputError)
    prompts = meta.get("prompts") if isinstance(meta, dict) else None
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise EvalInputError(f"{meta_path} records no prompts (not samples of a text-to-image model?); {fix}")
    with open_npz(images_path, "samples of deltafm sample") as data:
        if "prompt_ids" not in data.files:
            raise EvalInputError(f"{images_path}: no prompt_ids; {fix}")
        ids = read_npz_array(data, "prompt_ids", images_path, "samples of deltafm sample").reshape(-1)
    if ids.dtype.kind not in "iu" or len(ids) != n or (n and (ids.min() < 0 or ids.max() >= len(prompts))):
        raise EvalInputError(f"{images_path}: prompt_ids must be {n} integers in 0..{len(prompts) - 1}")
    return [prompts[int(i)] for i in ids]


def _score(args: Any) -> dict[str, Any]:
    from deltafm.eval.attributes_cli import read_captions
    from deltafm.eval.cli import load_samples, resolve_device
    from deltafm.eval.clip_score import load_clip_scorer, summarise

    images, _ = load_samples(args.images, "--images")
    if len(images) == 0:
        raise EvalInputError(f"{args.images} holds no images")
    prompts = (read_captions(args.captions) if args.captions is not None
               else prompts_of_samples(args.images, len(images)))
    if len(prompts) != len(images):
        raise EvalInputError(f"{len(images)} images but {len(prompts)} prompts in {args.captions}; give one per image")
    scorer = load_clip_scorer(args.clip, resolve_device(args.device))
    scores = scorer.score(images, prompts, args.batch_size)
    per_prompt: dict[str, list[float]] = {}
    for p, s in zip(prompts, scores):
        per_prompt.setdefault(p, []).append(float(s))
    return {**summarise(scores), "clip": str(args.clip), "clip_identity": scorer.identity,
            "images": str(args.images), "per_prompt": {p: float(np.mean(v)) for p, v in per_prompt.items()}}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (module docstring); returns 0, or 2 after one ``error:`` line on bad input."""
    args = build_parser().parse_args(argv)

    def compute() -> dict[str, Any]:
        if args.batch_size < 1:
            raise EvalInputError(f"--batch-size must be >= 1, got {args.batch_size}")
        return _score(args)

    return run_json_command(compute, args.threads, args.out)


if __name__ == "__main__":
    sys.exit(main())
