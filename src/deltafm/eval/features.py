"""Feature extractors for the metrics: the protocol, batched extraction, and a spec parser.

An extractor maps images in model space (float, (N, C, H, W), values in [−1, 1]) to

* ``features(x) -> (N, D)``: the embedding used for Fréchet distance and precision/recall
  (Inception pool3 in the FID convention, or a project classifier's penultimate layer), and
* ``logits(x) -> (N, K)`` or ``None``: class logits, for the Inception Score and class accuracy;
* optionally ``outputs(x) -> dict`` with ``features``, ``logits`` and ``spatial`` (N, S) in one pass
  (Inception: the sFID features and the bias-free IS logits of the ADM evaluator, see
  :mod:`deltafm.eval.inception`).

``extractor_id`` names the network and its exact weights (kind plus the sha256 of the weights file);
it is written into reference statistics so that samples are never compared to statistics made with
another network.

Specs understood by :func:`get_extractor`:

* ``classifier:PATH``: a classifier from :mod:`deltafm.eval.classifier` (safetensors + sha256 sidecar);
* ``inception:PATH``: FID Inception-v3 weights from a local file (:mod:`deltafm.eval.inception`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

from deltafm.eval.metrics import EvalInputError
from deltafm.pixels import images_to_model

__all__ = [
    "Extracted",
    "FeatureExtractor",
    "check_images",
    "evaluate_samples",
    "extract",
    "get_extractor",
    "reference_statistics",
]


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the metrics need from a network (inputs in [−1, 1], (N, C, H, W))."""

    extractor_id: str

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) embedding."""
        ...

    def logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """(N, K) class logits, or ``None`` when the network has no classifier head."""
        ...


@dataclass
class Extracted:
    """Output of :func:`extract`: float64 features (N, D), float64 logits (N, K) or ``None``, and float64
    spatial (sFID) features (N, S) or ``None``."""

    features: np.ndarray
    logits: np.ndarray | None
    spatial: np.ndarray | None = None


@torch.no_grad()
def extract(
    extractor: FeatureExtractor,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 256,
    layout: str = "NCHW",
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "features",
) -> Extracted:
    """Run ``extractor`` over ``images`` in batches (each batch converted with
    :func:`deltafm.pixels.images_to_model`).

    Uses ``extractor.outputs(x)`` when it exists (features, logits and spatial features in one pass),
    else ``extractor.features_and_logits(x)`` (one pass for both), else ``features`` and ``logits``.
    """
    if len(images) == 0:
        raise EvalInputError("no images to extract features from")
    if isinstance(extractor, torch.nn.Module):
        extractor.eval()
    every = getattr(extractor, "outputs", None)
    both = getattr(extractor, "features_and_logits", None)
    parts: dict[str, list[np.ndarray] | None] = {"features": [], "logits": [], "spatial": []}
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        x = images_to_model(images[start : start + batch_size], layout).to(device)
        if every is not None:
            out = every(x)
        elif both is not None:
            out = dict(zip(("features", "logits"), both(x), strict=True))
        else:
            out = {"features": extractor.features(x), "logits": extractor.logits(x)}
        for key, chunks in parts.items():
            value = out.get(key)
            if value is None or chunks is None:
                parts[key] = None  # "features" is never None: every extractor has them
            else:
                chunks.append(value.double().cpu().numpy())
    joined = {k: (np.concatenate(v) if v is not None else None) for k, v in parts.items()}
    return Extracted(joined["features"], joined["logits"], joined["spatial"])


def get_extractor(spec: str, device: torch.device | str = "cpu") -> FeatureExtractor:
    """Build an extractor from ``"classifier:PATH"`` or ``"inception:PATH"`` (weights never downloaded).

    The returned module is in eval mode on ``device``.
    """
    kind, sep, path = spec.partition(":")
    if not sep or not path:
        raise EvalInputError(f"extractor spec must be 'classifier:PATH' or 'inception:PATH', got {spec!r}")
    if kind == "classifier":
        from deltafm.eval.classifier import load_classifier

        model = load_classifier(path)
    elif kind == "inception":
        from deltafm.eval.inception import load_inception

        model = load_inception(path)
    else:
        raise EvalInputError(f"unknown extractor kind {kind!r} in {spec!r}; use 'classifier:PATH' or 'inception:PATH'")
    return model.to(device).eval()


def _item_shape(images: np.ndarray | torch.Tensor, layout: str) -> tuple[int, ...]:
    """(C, H, W) of one image of a batch in ``layout`` (3-d input: one channel)."""
    shape = tuple(int(s) for s in images.shape[1:])
    if len(shape) == 2:
        return (1, *shape)
    return (shape[2], shape[0], shape[1]) if layout == "NHWC" and len(shape) == 3 else shape


def check_images(extractor: FeatureExtractor, images: np.ndarray | torch.Tensor, layout: str, what: str,
                 min_count: int = 2, allow_mismatch: bool = False) -> None:
    """Refuse images the extractor cannot score meaningfully: fewer than ``min_count``, or (for a project
    classifier, unless ``allow_mismatch``) another (C, H, W) than the images it was trained on."""
    if len(images) < min_count:
        raise EvalInputError(f"{what}: need at least {min_count} images, got {len(images)}")
    trained = getattr(extractor, "meta", {}).get("image_shape")
    shape = _item_shape(images, layout)
    if trained is not None and tuple(trained) != shape and not allow_mismatch:
        raise EvalInputError(
            f"{what}: images are {'x'.join(map(str, shape))} (C x H x W) but the classifier "
            f"{extractor.extractor_id} was trained on {'x'.join(map(str, trained))}; use a classifier of "
            "this dataset (or --allow-mismatch)"
        )


# --------------------------------------------------------------------------------------------
# From images to metrics (used by the CLI and by the comparison study)
# --------------------------------------------------------------------------------------------


def reference_statistics(
    extractor: FeatureExtractor,
    images: np.ndarray | torch.Tensor,
    layout: str = "NCHW",
    keep_features: bool = True,
    meta: dict | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = True,
):
    """Features of real images → :class:`~deltafm.eval.metrics.ReferenceStats` (μ, Σ, features, meta, and
    μ_s, Σ_s of the spatial features when the extractor has them: Inception's sFID statistics).

    ``meta`` gains ``extractor`` (the extractor id), ``count`` and ``feature_dim``.
    """
    from deltafm.eval.metrics import ReferenceStats, feature_statistics

    check_images(extractor, images, layout, "reference images")
    out = extract(extractor, images, batch_size, layout, device, progress, desc="reference features")
    mu, sigma = feature_statistics(out.features)
    mu_s, sigma_s = feature_statistics(out.spatial) if out.spatial is not None else (None, None)
    full_meta = {
        **(meta or {}),
        "extractor": extractor.extractor_id,
        "count": int(out.features.shape[0]),
        "feature_dim": int(out.features.shape[1]),
    }
    return ReferenceStats(mu, sigma, out.features.astype(np.float32) if keep_features else None, full_meta,
                          mu_s=mu_s, sigma_s=sigma_s)


def _pr_subsets(real: np.ndarray, fake: np.ndarray, pr_max: int | str | None, seed: int):
    """The real and generated feature rows precision/recall compare: each set subsampled to at most
    ``pr_max`` rows (``"match"``: the number of generated samples) by a sorted seeded permutation, real
    first, from one ``np.random.default_rng(seed)``; None keeps both sets whole."""
    if pr_max is None:
        return real, fake
    if pr_max == "match":
        pr_max = len(fake)
    if isinstance(pr_max, bool) or not isinstance(pr_max, int) or pr_max < 1:
        raise EvalInputError(f"pr_max must be a positive integer, 'match' or None, got {pr_max!r}")
    g = np.random.default_rng(seed)
    real = real[np.sort(g.permutation(len(real))[:pr_max])]
    fake = fake[np.sort(g.permutation(len(fake))[:pr_max])]
    return real, fake


def _check_inputs(extractor: FeatureExtractor, images, ref, labels, layout: str, k: int, splits: int,
                  pr_max: int | str | None, num_classes: int | None, allow_mismatch: bool,
                  is_split_size: int | None = None) -> None:
    """The checks of :func:`evaluate_samples` that need no forward pass (bad input fails fast)."""
    ref_id = ref.meta.get("extractor")
    if ref_id is not None and ref_id != extractor.extractor_id and not allow_mismatch:
        raise EvalInputError(
            f"reference statistics were made with {ref_id}, but the extractor is {extractor.extractor_id}; "
            "recompute them (ref-stats) or pass allow_mismatch"
        )
    if k < 1 or splits < 1:
        raise EvalInputError(f"k and splits must be >= 1, got k={k}, splits={splits}")
    if is_split_size is not None and is_split_size < 1:
        raise EvalInputError(f"is_split_size must be >= 1, got {is_split_size}")
    if ref.features is not None:
        if len(ref.features) <= k:
            raise EvalInputError(f"precision/recall with k={k} needs more than {k} reference features, the "
                                 f"statistics hold {len(ref.features)}")
        if isinstance(pr_max, int) and not isinstance(pr_max, bool) and pr_max <= k:
            raise EvalInputError(f"pr_max ({pr_max}) must be larger than k ({k})")
    check_images(extractor, images, layout, "samples", min_count=k + 1 if ref.features is not None else 2,
                 allow_mismatch=allow_mismatch)
    if labels is not None:
        y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
        if len(y) != len(images):
            raise EvalInputError(f"{len(y)} labels for {len(images)} images")
        if num_classes is not None and len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise EvalInputError(
                f"labels must lie in 0..{num_classes - 1} (the classifier's {num_classes} classes), got values "
                f"from {int(y.min())} to {int(y.max())}"
            )


def _fd(feats: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, fd_method: str) -> tuple[float, str]:
    """FD of ``feats`` against (μ, Σ) and the method used (``auto``: sqrtm for N > D, else lowrank)."""
    from deltafm.eval.metrics import feature_statistics, frechet_distance, frechet_distance_lowrank

    method = fd_method
    if method == "auto":
        method = "sqrtm" if feats.shape[0] > feats.shape[1] else "lowrank"
    if method == "lowrank":
        return frechet_distance_lowrank(feats, mu_ref, sigma_ref), method
    mu, sigma = feature_statistics(feats)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref, method=method), method


def _inception_score(logits: np.ndarray, splits: int, is_split_size: int | None) -> dict:
    """IS entries of the result: ``splits`` equal chunks (at most N), or chunks of ``is_split_size``."""
    from deltafm.eval.metrics import inception_score

    n = logits.shape[0]
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    if is_split_size is not None:
        mean, std = inception_score(probs, split_size=is_split_size)
        return {"inception_score": mean, "inception_score_std": std, "is_splits": -(-n // is_split_size),
                "is_split_size": is_split_size}
    mean, std = inception_score(probs, splits=min(splits, n))
    return {"inception_score": mean, "inception_score_std": std, "is_splits": min(splits, n)}


def _against_features(real_all: np.ndarray, fake_all: np.ndarray, k: int, pr_max: int | str | None, seed: int,
                      pr_device: torch.device | str, kid_subsets: int, kid_subset_size: int) -> dict:
    """Precision/recall (subsampled, :func:`_pr_subsets`) and KID (``kid_subsets`` > 0) against the reference
    features, with their settings."""
    from deltafm.eval.metrics import precision_recall

    real, fake = _pr_subsets(real_all, fake_all, pr_max, seed)
    out: dict = {}
    out["precision"], out["recall"] = precision_recall(real, fake, k=k, device=pr_device)
    out.update(pr_k=k, pr_max=pr_max, pr_seed=seed, pr_real=int(len(real)), pr_fake=int(len(fake)))
    if kid_subsets > 0:
        from deltafm.eval.kid import kid

        out["kid"], out["kid_std"], out["kid_subset_size"] = kid(fake_all, real_all, subsets=kid_subsets,
                                                                 subset_size=kid_subset_size, seed=seed)
        out["kid_subsets"] = kid_subsets
    return out


def evaluate_samples(
    extractor: FeatureExtractor,
    images: np.ndarray | torch.Tensor,
    ref,
    labels: np.ndarray | torch.Tensor | None = None,
    layout: str = "NCHW",
    k: int = 3,
    splits: int = 10,
    pr_max: int | str | None = 10_000,
    seed: int = 0,
    fd_method: str = "sqrtm",
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = True,
    allow_mismatch: bool = False,
    is_split_size: int | None = None,
    pr_device: torch.device | str = "cpu",
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
) -> dict:
    """All metrics of generated ``images`` against reference statistics ``ref`` (a ``ReferenceStats``):
    the one scoring function of the package (``deltafm eval eval`` and the study both call it).

    Computes FD (always; ``fd_method`` "sqrtm" (the FID convention) or "eigh", see
    :func:`~deltafm.eval.metrics.frechet_distance`, "lowrank"
    (:func:`~deltafm.eval.metrics.frechet_distance_lowrank`, exact) or "auto": sqrtm when the samples'
    covariance can have full rank (more samples than feature dimensions, e.g. FID-50K), else lowrank; the
    result's ``fd_method`` names the one used); sFID, the same distance on the spatial features (when the
    extractor has them and ``ref`` holds ``mu_s``/``sigma_s``: Inception); IS (when the extractor has logits;
    ``splits`` chunks, reduced to N if fewer samples, or chunks of ``is_split_size`` consecutive samples as the
    ADM evaluator does with 5000); precision/recall with k-NN manifolds (when ``ref.features`` exists; both sets
    subsampled to at most ``pr_max`` rows with a permutation seeded by ``seed``; ``"match"`` = as many real rows
    as samples, None = no subsampling, as ADM; distances on ``pr_device``); KID (:mod:`deltafm.eval.kid`, also
    when ``ref.features`` exists: ``kid_subsets`` subsets of ``kid_subset_size`` rows of all samples and all
    reference features, seeded by ``seed``; ``kid_subsets=0``: none); class accuracy (when ``labels`` are
    given and the extractor is a classifier whose classes are the dataset's, i.e. not Inception). The settings
    are recorded in the result (``fd_method``, ``is_splits``, ``is_split_size``, ``pr_k``, ``pr_max``,
    ``pr_seed``, ``pr_real``, ``pr_fake``).

    Raises:
        EvalInputError (a ValueError): ``ref`` was computed with a different extractor (unless
            ``allow_mismatch``), images of another shape than the classifier's, fewer than 2 images (more
            than ``k`` with reference features), labels outside the classifier's classes, a bad ``k``,
            ``splits`` or ``pr_max``.
    """
    from deltafm.eval.metrics import class_accuracy

    num_classes = getattr(getattr(extractor, "config", None), "num_classes", None)
    _check_inputs(extractor, images, ref, labels, layout, k, splits, pr_max, num_classes, allow_mismatch,
                  is_split_size)
    if kid_subsets < 0 or kid_subset_size < 2:
        raise EvalInputError(f"need kid_subsets >= 0 and kid_subset_size >= 2, got {kid_subsets} and {kid_subset_size}")
    out = extract(extractor, images, batch_size, layout, device, progress, desc="sample features")
    if out.features.shape[1] != ref.mu.shape[0]:
        raise EvalInputError(f"sample features are {out.features.shape[1]}-d but the reference statistics are "
                             f"{ref.mu.shape[0]}-d: they were made with another extractor")
    n = out.features.shape[0]
    fd_value, fd_used = _fd(out.features, ref.mu, ref.sigma, fd_method)
    result: dict = {
        "num_samples": int(n),
        "extractor": extractor.extractor_id,
        "reference": {k_: v for k_, v in ref.meta.items()},
        "fd": fd_value,
        "fd_method": fd_used,
    }
    if out.spatial is not None and ref.mu_s is not None:
        if out.spatial.shape[1] != ref.mu_s.shape[0]:
            raise EvalInputError(f"sample spatial features are {out.spatial.shape[1]}-d but the reference mu_s is "
                                 f"{ref.mu_s.shape[0]}-d: they were made with another extractor")
        result["sfid"], result["sfid_method"] = _fd(out.spatial, ref.mu_s, ref.sigma_s, fd_method)
    if out.logits is not None:
        result.update(_inception_score(out.logits, splits, is_split_size))
    if ref.features is not None:
        result.update(_against_features(ref.features, out.features, k, pr_max, seed, pr_device, kid_subsets,
                                        kid_subset_size))
    if labels is not None and out.logits is not None and num_classes is not None:
        pred = out.logits.argmax(axis=1)
        result["class_accuracy"] = class_accuracy(pred, labels, num_classes=num_classes).to_dict()
    return result
