"""GenEval-like scores of generated coloured-shapes images against their prompts, read by an
:class:`~deltafm.eval.attributes.AttributeReader`; the reader's own accuracy against ground truth; FD in its
feature space.

Prompt scores (:func:`score_prompts`, :func:`score_scenes`). Each caption is parsed into claims
(:func:`deltafm.data.shapes_parse.parse_caption`: shape, colour, size, cell of each mentioned object, the
number of objects, relations) and checked on the scene the reader sees, under the assignment of read objects
to mentions that satisfies the most claims (:func:`~deltafm.data.shapes_parse.match_claims`). Over P prompts
with claims c_{p,j} and truth values t_{p,j} ∈ {0, 1}:

* ``per_attribute[kind]`` = Σ_{p,j: kind} t_{p,j} / #{claims of that kind} (None when there are none);
* ``prompt_accuracy`` = (1/P) Σ_p Π_j t_{p,j}, the fraction of prompts whose every claim holds (GenEval's
  score); ``prompt_accuracy_by_count[n]``: the same over the prompts that mention n objects;
* ``agreement`` = (1/P) Σ_p (1/J_p) Σ_j t_{p,j}, the mean fraction of a prompt's claims that hold.

On real images with their own captions every score is 1 for a perfect reader; that (the *caption agreement*
of :func:`deltafm.eval.attributes_train.evaluate_reader`) bounds what generated images can be credited with.

Single objects (:func:`score_single_objects`): the reader's most confident object per image against the labels
the image was generated for (ids into ``config.vocab(factor)``, as :class:`~deltafm.data.shapes.SingleObjects`
holds them): accuracy per factor, ``all`` (every given factor right) and ``one_object`` (exactly one object
read at the threshold).

Reader accuracy (:func:`compare_scenes`): read objects are matched to true ones greedily by Chebyshev distance
of the centres, closest first, pairs closer than (size_px[0] + gap_px) / 2 only; an unmatched true object
counts as wrong for every attribute.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from deltafm.data.shapes import Scene, ShapesConfig, generate_shapes
from deltafm.data.shapes_parse import CLAIM_KINDS, Claim, claims_by_attribute, match_claims, parse_caption
from deltafm.eval.attributes import AttributeReader
from deltafm.eval.metrics import EvalInputError

__all__ = ["compare_scenes", "parse_captions", "reader_fd", "reader_kid", "scene_reference_statistics", "score_prompts",
           "score_scenes", "score_single_objects"]


def _check_images(reader: AttributeReader, images: np.ndarray | torch.Tensor, count: int | None = None) -> None:
    c = reader.config.canvas
    shape = tuple(int(s) for s in images.shape)
    if len(shape) != 4 or shape[1:] != (3, c, c) or str(images.dtype).rpartition(".")[2] != "uint8":
        raise EvalInputError(f"images must be uint8 (N, 3, {c}, {c}) (the reader's canvas, channel first), "
                             f"got {images.dtype} {shape}")
    if count is not None and shape[0] != count:
        raise EvalInputError(f"{count} prompts or labels for {shape[0]} images")


def parse_captions(captions: Sequence[str], config: ShapesConfig) -> list[list[Claim]]:
    """Claims of every caption; a caption the parser cannot read raises :class:`EvalInputError` naming it."""
    out = []
    for i, caption in enumerate(captions):
        try:
            out.append(parse_caption(caption, config))
        except ValueError as err:
            raise EvalInputError(f"prompt {i}: {err}") from None
    return out


def score_scenes(scenes: Sequence[Scene], claims: Sequence[Sequence[Claim]], details: bool = False) -> dict[str, Any]:
    """Prompt scores (module docstring) of read ``scenes`` against the claims of their prompts. ``details`` adds
    ``prompt_ok`` (bool per prompt) and ``prompt_fraction`` (fraction of claims held per prompt)."""
    if len(scenes) != len(claims):
        raise EvalInputError(f"{len(claims)} prompts for {len(scenes)} scenes")
    if not scenes:
        raise EvalInputError("no prompts to score")
    held = {k: [0, 0] for k in CLAIM_KINDS}
    ok, fraction, by_count = [], [], {}
    for scene, cs in zip(scenes, claims):
        _, truth = match_claims(cs, scene)
        for kind, (h, n) in claims_by_attribute(cs, truth).items():
            held[kind][0] += h
            held[kind][1] += n
        ok.append(all(truth))
        fraction.append(sum(truth) / len(truth))
        n_obj = next(int(c.value) for c in cs if c.kind == "count")
        by_count.setdefault(n_obj, []).append(ok[-1])
    out: dict[str, Any] = {
        "num_prompts": len(scenes),
        "prompt_accuracy": float(np.mean(ok)),
        "agreement": float(np.mean(fraction)),
        "per_attribute": {k: (h / n if n else None) for k, (h, n) in held.items()},
        "num_claims": {k: n for k, (_, n) in held.items()},
        "prompt_accuracy_by_count": {n: float(np.mean(v)) for n, v in sorted(by_count.items())},
    }
    if details:
        out["prompt_ok"], out["prompt_fraction"] = ok, fraction
    return out


def score_prompts(reader: AttributeReader, images: np.ndarray | torch.Tensor, captions: Sequence[str],
                  config: ShapesConfig | None = None, threshold: float = 0.5, details: bool = False,
                  ref: Any = None) -> dict[str, Any]:
    """Read generated uint8 ``images`` (N, 3, canvas, canvas) and score them against their ``captions``
    (:func:`score_scenes`). ``ref``: reference statistics (:func:`scene_reference_statistics`) to add ``fd``."""
    config = config or ShapesConfig(canvas=reader.config.canvas)
    reader.config.check_shapes(config)
    _check_images(reader, images, len(captions))
    claims = parse_captions(captions, config)
    out = score_scenes(reader.read(images, threshold), claims, details)
    out["reader"] = reader.extractor_id
    if ref is not None:
        out["fd"] = reader_fd(reader, images, ref)
    return out


def score_single_objects(reader: AttributeReader, images: np.ndarray | torch.Tensor,
                         labels: dict[str, Sequence[int] | np.ndarray], config: ShapesConfig | None = None,
                         threshold: float = 0.5) -> dict[str, Any]:
    """Per-condition accuracy of single-object images (module docstring); ``labels``: factor -> ids (N,)."""
    config = config or ShapesConfig(canvas=reader.config.canvas)
    reader.config.check_shapes(config)
    if not labels:
        raise EvalInputError("no labels to score: give ids for some of shape, colour, size, cell")
    y = {f: np.asarray(v).reshape(-1) for f, v in labels.items()}
    _check_images(reader, images, len(next(iter(y.values()))))
    vocab = {f: config.vocab(f) for f in y}  # refuses unknown factors
    for f, v in y.items():
        if len(v) != len(images) or (len(v) and (v.min() < 0 or v.max() >= len(vocab[f]))):
            raise EvalInputError(f"labels[{f!r}] must be {len(images)} ids in 0..{len(vocab[f]) - 1}")
    top = [s.objects[0] for s in reader.read(images, top1=True)]
    right = {}
    for f, v in y.items():
        pred = [o.cell if f == "cell" else vocab[f].index(getattr(o, f)) for o in top]
        right[f] = np.asarray(pred) == v
    counts = np.asarray([s.count for s in reader.read(images, threshold)])
    return {"num_images": len(images), "per_condition": {f: float(r.mean()) for f, r in right.items()},
            "all": float(np.logical_and.reduce(list(right.values())).mean()),
            "one_object": float((counts == 1).mean()), "reader": reader.extractor_id}


def _match(pred: Scene, true: Scene, near: float) -> list[int | None]:
    """For each true object the index of its read object (greedy by centre distance, < near) or None."""
    pairs = sorted((max(abs(p.centre[0] - t.centre[0]), abs(p.centre[1] - t.centre[1])), i, j)
                   for i, t in enumerate(true.objects) for j, p in enumerate(pred.objects))
    out: list[int | None] = [None] * true.count
    used = set()
    for d, i, j in pairs:
        if d < near and out[i] is None and j not in used:
            out[i] = j
            used.add(j)
    return out


def compare_scenes(pred: Sequence[Scene], true: Sequence[Scene], near: float) -> dict[str, float]:
    """Reader accuracy against ground truth (module docstring): per-object ``shape``, ``colour``, ``size``,
    ``cell``, ``box`` (exact) accuracy, ``recall`` and ``precision`` of objects, per-scene ``count`` and
    ``exact_scene`` (the same objects, boxes included) accuracy."""
    if len(pred) != len(true) or not true:
        raise EvalInputError(f"{len(pred)} read scenes for {len(true)} true ones")
    right = Counter()
    n_true = n_pred = count_ok = exact = 0
    for p, t in zip(pred, true):
        match = _match(p, t, near)
        for i, j in enumerate(match):
            if j is None:
                continue
            a, b = t.objects[i], p.objects[j]
            right["matched"] += 1
            for f in ("shape", "colour", "size", "cell"):
                right[f] += getattr(a, f) == getattr(b, f)
            right["box"] += a.bbox == b.bbox
        n_true, n_pred = n_true + t.count, n_pred + p.count
        count_ok += p.count == t.count
        exact += Counter(p.objects) == Counter(t.objects)
    out = {f: right[f] / n_true for f in ("shape", "colour", "size", "cell", "box")}
    out.update(recall=right["matched"] / n_true, precision=right["matched"] / max(n_pred, 1),
               count=count_ok / len(true), exact_scene=exact / len(true))
    return out


def scene_reference_statistics(reader: AttributeReader, n: int = 10_000, seed: int = 1, split: str = "all",
                               config: ShapesConfig | None = None, progress: bool = False):
    """:class:`~deltafm.eval.metrics.ReferenceStats` of the reader's features on ``n`` real scenes of ``split``
    under ``seed`` (``meta`` records them), for :func:`reader_fd` or ``deltafm.eval.evaluate_samples``."""
    from deltafm.eval.features import reference_statistics

    config = config or ShapesConfig(canvas=reader.config.canvas)
    reader.config.check_shapes(config)
    data = generate_shapes(n, seed=seed, split=split, config=config)
    meta = {"dataset": "shapes-scenes", "split": split, "seed": seed, "canvas": config.canvas}
    return reference_statistics(reader, data.images, meta=meta, progress=progress)


def reader_fd(reader: AttributeReader, images: np.ndarray | torch.Tensor, ref: Any) -> float:
    """Fréchet distance (:mod:`deltafm.eval.frechet`) between the reader's features of uint8 ``images`` and
    ``ref`` (μ, Σ); sqrtm when N > D, else the exact low-rank route. ``ref`` must come from this reader."""
    from deltafm.eval.features import extract
    from deltafm.eval.frechet import feature_statistics, frechet_distance, frechet_distance_lowrank

    made_with = getattr(ref, "meta", {}).get("extractor")
    if made_with is not None and made_with != reader.extractor_id:
        raise EvalInputError(f"reference statistics were made with {made_with}, the reader is {reader.extractor_id}")
    _check_images(reader, images)
    feats = extract(reader, images, progress=False).features
    if feats.shape[0] > feats.shape[1]:
        mu, sigma = feature_statistics(feats)
        return frechet_distance(mu, sigma, ref.mu, ref.sigma)
    return frechet_distance_lowrank(feats, ref.mu, ref.sigma)


def reader_kid(reader: AttributeReader, images: np.ndarray | torch.Tensor, ref: Any, subsets: int = 100,
               subset_size: int = 1000, seed: int = 0) -> float:
    """KID (:func:`deltafm.eval.kid.kid`) between the reader's features of uint8 ``images`` and the reference
    features kept in ``ref`` (statistics made with ``keep_features``); ``ref`` must come from this reader."""
    from deltafm.eval.features import extract
    from deltafm.eval.kid import kid

    made_with = getattr(ref, "meta", {}).get("extractor")
    if made_with is not None and made_with != reader.extractor_id:
        raise EvalInputError(f"reference statistics were made with {made_with}, the reader is {reader.extractor_id}")
    if getattr(ref, "features", None) is None:
        raise EvalInputError("KID needs the reference features; these statistics hold only mean and covariance")
    _check_images(reader, images)
    return kid(extract(reader, images, progress=False).features, ref.features, subsets, subset_size, seed)[0]
