"""Feature extractors for the metrics: the protocol, batched extraction, and a spec parser.

An extractor maps images in model space (float, (N, C, H, W), values in [−1, 1]) to

* ``features(x) -> (N, D)``: the embedding used for Fréchet distance and precision/recall
  (Inception pool3 in the FID convention, or a project classifier's penultimate layer), and
* ``logits(x) -> (N, K)`` or ``None``: class logits, for the Inception Score and class accuracy.

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

__all__ = [
    "Extracted",
    "FeatureExtractor",
    "evaluate_samples",
    "extract",
    "get_extractor",
    "images_to_model",
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


def images_to_model(images: np.ndarray | torch.Tensor, layout: str = "NCHW") -> torch.Tensor:
    """uint8 pixels p -> float32 x = p / 127.5 − 1 in [−1, 1], as (N, C, H, W).

    Args:
        images: uint8 array of shape (N, H, W) (one channel), (N, C, H, W) or (N, H, W, C).
            Float input is taken to be in model space already and only re-laid out.
        layout: ``"NCHW"`` or ``"NHWC"`` (the ADM sample layout) for 4-d input.
    """
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        elif layout != "NCHW":
            raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    else:
        raise ValueError(f"images must be 3-d or 4-d, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    if not x.dtype.is_floating_point:
        raise TypeError(f"expected uint8 pixels or float model-space images, got {x.dtype}")
    return x.float()


@dataclass
class Extracted:
    """Output of :func:`extract`: float64 features (N, D) and float64 logits (N, K) or ``None``."""

    features: np.ndarray
    logits: np.ndarray | None


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
    """Run ``extractor`` over ``images`` in batches (converting each batch with :func:`images_to_model`).

    Uses ``extractor.features_and_logits(x)`` when it exists (one forward pass for both), else
    ``features`` and ``logits`` separately.
    """
    if len(images) == 0:
        raise ValueError("no images to extract features from")
    if isinstance(extractor, torch.nn.Module):
        extractor.eval()
    both = getattr(extractor, "features_and_logits", None)
    feats: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    has_logits = True
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        x = images_to_model(images[start : start + batch_size], layout).to(device)
        if both is not None:
            f, lg = both(x)
        else:
            f, lg = extractor.features(x), extractor.logits(x)
        feats.append(f.double().cpu().numpy())
        if lg is None:
            has_logits = False
        else:
            logits.append(lg.double().cpu().numpy())
    return Extracted(np.concatenate(feats), np.concatenate(logits) if has_logits else None)


def get_extractor(spec: str, device: torch.device | str = "cpu") -> FeatureExtractor:
    """Build an extractor from ``"classifier:PATH"`` or ``"inception:PATH"`` (weights never downloaded).

    The returned module is in eval mode on ``device``.
    """
    kind, sep, path = spec.partition(":")
    if not sep or not path:
        raise ValueError(f"extractor spec must be 'classifier:PATH' or 'inception:PATH', got {spec!r}")
    if kind == "classifier":
        from deltafm.eval.classifier import load_classifier

        model = load_classifier(path)
    elif kind == "inception":
        from deltafm.eval.inception import load_inception

        model = load_inception(path)
    else:
        raise ValueError(f"unknown extractor kind {kind!r}; use 'classifier' or 'inception'")
    return model.to(device).eval()


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
    """Features of real images → :class:`~deltafm.eval.metrics.ReferenceStats` (μ, Σ, features, meta).

    ``meta`` gains ``extractor`` (the extractor id), ``count`` and ``feature_dim``.
    """
    from deltafm.eval.metrics import ReferenceStats, feature_statistics

    out = extract(extractor, images, batch_size, layout, device, progress, desc="reference features")
    mu, sigma = feature_statistics(out.features)
    full_meta = {
        **(meta or {}),
        "extractor": extractor.extractor_id,
        "count": int(out.features.shape[0]),
        "feature_dim": int(out.features.shape[1]),
    }
    return ReferenceStats(mu, sigma, out.features.astype(np.float32) if keep_features else None, full_meta)


def evaluate_samples(
    extractor: FeatureExtractor,
    images: np.ndarray | torch.Tensor,
    ref,
    labels: np.ndarray | torch.Tensor | None = None,
    layout: str = "NCHW",
    k: int = 3,
    splits: int = 10,
    pr_max: int | None = 10_000,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = True,
    allow_mismatch: bool = False,
) -> dict:
    """All metrics of generated ``images`` against reference statistics ``ref`` (a ``ReferenceStats``).

    Computes FD (always); IS (when the extractor has logits; ``splits`` chunks, reduced to N if fewer
    samples); precision/recall with k-NN manifolds (when ``ref.features`` exists; both sets subsampled
    to at most ``pr_max`` rows with a seeded permutation); class accuracy (when ``labels`` are given and
    the extractor is a classifier whose classes are the dataset's, i.e. not Inception).

    Raises:
        ValueError: ``ref`` was computed with a different extractor (unless ``allow_mismatch``).
    """
    from deltafm.eval.metrics import (
        class_accuracy,
        feature_statistics,
        frechet_distance,
        inception_score,
        precision_recall,
    )

    ref_id = ref.meta.get("extractor")
    if ref_id is not None and ref_id != extractor.extractor_id and not allow_mismatch:
        raise ValueError(
            f"reference statistics were made with {ref_id}, but the extractor is {extractor.extractor_id}; "
            "recompute them (ref-stats) or pass allow_mismatch"
        )
    out = extract(extractor, images, batch_size, layout, device, progress, desc="sample features")
    n = out.features.shape[0]
    mu, sigma = feature_statistics(out.features)
    result: dict = {
        "num_samples": int(n),
        "extractor": extractor.extractor_id,
        "reference": {k_: v for k_, v in ref.meta.items()},
        "fd": frechet_distance(mu, sigma, ref.mu, ref.sigma),
    }
    if out.logits is not None:
        probs = torch.softmax(torch.from_numpy(out.logits), dim=1).numpy()
        is_mean, is_std = inception_score(probs, splits=min(splits, n))
        result.update(inception_score=is_mean, inception_score_std=is_std, is_splits=min(splits, n))
    if ref.features is not None:
        g = np.random.default_rng(seed)
        real, fake = ref.features, out.features
        if pr_max is not None:
            real = real[np.sort(g.permutation(len(real))[:pr_max])]
            fake = fake[np.sort(g.permutation(len(fake))[:pr_max])]
        result["precision"], result["recall"] = precision_recall(real, fake, k=k)
        result.update(pr_k=k, pr_real=int(len(real)), pr_fake=int(len(fake)))
    num_classes = getattr(getattr(extractor, "config", None), "num_classes", None)
    if labels is not None and out.logits is not None and num_classes is not None:
        pred = out.logits.argmax(axis=1)
        result["class_accuracy"] = class_accuracy(pred, labels, num_classes=num_classes).to_dict()
    return result
