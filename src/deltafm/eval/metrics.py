"""Sample-quality metrics on feature vectors and class predictions.

Everything here works on plain arrays (numpy, or torch tensors that are converted), so the
metrics do not care which network produced the features (see :mod:`deltafm.eval.features`).

* **Fréchet distance (FD / FID)** (:mod:`deltafm.eval.frechet`, re-exported here). Fit a Gaussian to each feature set,
  N(μ₁, Σ₁) and N(μ₂, Σ₂); the squared 2-Wasserstein distance between them is

      FD = ‖μ₁ − μ₂‖² + tr(Σ₁) + tr(Σ₂) − 2 tr((Σ₁ Σ₂)^{1/2}).

  With Inception-v3 pool3 features this is the FID of Heusel et al. (2017).
* **Inception Score (IS).** For class probabilities p(y|x):
  IS = exp(E_x KL(p(y|x) ‖ p(y))), p(y) = E_x p(y|x), averaged over ``splits`` disjoint chunks.
  It lies in [1, K] for K classes: 1 for identical predictions, K for confident predictions spread
  evenly over the K classes.
* **Precision and recall (k-NN manifolds,** Kynkäänniemi et al. 2019). Each real feature r_i gets a
  ball of radius ρ_i = distance to its k-th nearest other real feature; the union of the balls is the
  estimated real manifold. Precision = fraction of generated features inside the real manifold;
  recall = fraction of real features inside the generated manifold (built the same way).
* **Class accuracy.** Fraction of generated samples that a classifier assigns to the class they were
  generated for, overall and per class.

Reference statistics are stored as ``.npz`` files with ``mu``, ``sigma`` (the names used by the
ADM / pytorch-fid tools), optionally ``mu_s``, ``sigma_s`` (the sFID statistics of ADM's reference
batches), ``features`` (for precision/recall), ``arr_0`` (the images, as in an ADM reference batch) and
``meta`` (a JSON string; never pickled). ADM reference batches themselves are read by
:mod:`deltafm.eval.adm`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from deltafm.errors import UserError
from deltafm.eval.frechet import (
    _as_numpy,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    frechet_distance_lowrank,
)

ArrayLike = np.ndarray | torch.Tensor

__all__ = [
    "ClassAccuracy",
    "EvalInputError",
    "EvalKeyError",
    "ReferenceStats",
    "class_accuracy",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "frechet_distance_lowrank",
    "inception_score",
    "load_reference_stats",
    "open_npz",
    "precision_recall",
    "read_npz_array",
    "save_reference_stats",
]


class EvalInputError(UserError, ValueError):
    """Bad input to the evaluation (a samples or statistics file, weights, labels, an option): the message
    names the file or option and what it must be. A ``ValueError`` as well."""


class EvalKeyError(EvalInputError, KeyError):
    """An input file lacks entries it must hold (a ``KeyError`` as well); prints as its plain message."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------------
# Reference statistics on disk
# --------------------------------------------------------------------------------------------


@dataclass
class ReferenceStats:
    """Cached statistics of a reference (real-data) feature set.

    Attributes:
        mu: (D,) feature mean.
        sigma: (D, D) feature covariance.
        features: optional (N, D) float32 features, needed for precision/recall.
        meta: free-form metadata (dataset, split, extractor id, count, ...).
        mu_s, sigma_s: optional mean (S,) and covariance (S, S) of the spatial features (sFID; Inception
            only, S = 2023).
    """

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None


def save_reference_stats(
    path: str | os.PathLike,
    mu: ArrayLike,
    sigma: ArrayLike,
    features: ArrayLike | None = None,
    meta: dict[str, Any] | None = None,
    mu_s: ArrayLike | None = None,
    sigma_s: ArrayLike | None = None,
    images: np.ndarray | None = None,
) -> None:
    """Write ``mu``, ``sigma`` (float64), optional ``mu_s``, ``sigma_s`` (float64, sFID), ``features``
    (float32), ``arr_0`` (``images``: uint8 (N, H, W, C), as in an ADM reference batch) and ``meta`` (JSON)
    to .npz. With ``mu_s``/``sigma_s`` and ``images`` the file is also a complete ADM reference batch."""
    arrays: dict[str, np.ndarray] = {"mu": _as_numpy(mu), "sigma": _as_numpy(sigma)}
    if (mu_s is None) != (sigma_s is None):
        raise ValueError("mu_s and sigma_s go together")
    if mu_s is not None:
        arrays["mu_s"], arrays["sigma_s"] = _as_numpy(mu_s), _as_numpy(sigma_s)
    if features is not None:
        arrays["features"] = _as_numpy(features, np.float32)
    if images is not None:
        arrays["arr_0"] = np.asarray(images, dtype=np.uint8)
    arrays["meta"] = np.array(json.dumps(meta or {}, sort_keys=True))
    with open(path, "wb") as fh:  # a file handle keeps numpy from appending ".npz" to the name
        np.savez(fh, **arrays)


def open_npz(path: str | os.PathLike, what: str) -> Any:
    """``np.load(path, allow_pickle=False)`` of an ``.npz`` archive, or an :class:`EvalInputError` saying
    what ``what`` must be (missing files stay ``FileNotFoundError``). Nothing is ever unpickled."""
    import zipfile

    if os.path.isdir(path):
        raise EvalInputError(f"{path} is a folder; {what}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if not zipfile.is_zipfile(path):
        raise EvalInputError(f"{path} is not an .npz archive; {what}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise EvalInputError(f"{path}: unreadable .npz ({err}); {what}") from None


def read_npz_array(data: Any, key: str, path: str | os.PathLike, what: str) -> np.ndarray:
    """``data[key]``; object (pickled) or damaged members become an :class:`EvalInputError`."""
    import zipfile

    try:
        return data[key]
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise EvalInputError(f"{path}: cannot read {key!r} ({err}); {what}") from None


_REF_WHAT = ("reference statistics must be an .npz written by `deltafm eval ref-stats` or an ADM reference batch "
             "(float mu (D,), sigma (D, D), optional mu_s (S,), sigma_s (S, S), features (N, D), meta JSON), read "
             "with allow_pickle=False")


def _check_stats(path: str | os.PathLike, name: tuple[str, str], mu: np.ndarray,
                 sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A numeric, finite mean (D,) and covariance (D, D) as float64, or an :class:`EvalInputError`."""
    for key, arr in ((name[0], mu), (name[1], sigma)):
        if arr.dtype.kind not in "fiu":
            raise EvalInputError(f"{path}: {key!r} must be numeric, got {arr.dtype}; {_REF_WHAT}")
    d = mu.reshape(-1).shape[0]
    if sigma.shape != (d, d):
        raise EvalInputError(f"{path}: shapes do not fit together ({name[0]} {mu.shape}, {name[1]} {sigma.shape}); "
                             f"{_REF_WHAT}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise EvalInputError(f"{path}: {name[0]}/{name[1]} hold NaN or inf; recompute the statistics (ref-stats)")
    return mu.astype(np.float64).reshape(-1), sigma.astype(np.float64)


def load_reference_stats(path: str | os.PathLike) -> ReferenceStats:
    """Read statistics written by :func:`save_reference_stats` (or any .npz with ``mu``/``sigma``, such as
    an ADM reference batch; its images ``arr_0`` are not read here, see :mod:`deltafm.eval.adm`).

    Loaded with ``allow_pickle=False``: object arrays are refused. Raises ``FileNotFoundError``,
    :class:`EvalKeyError` (missing ``mu``/``sigma``, or only one of ``mu_s``/``sigma_s``) or
    :class:`EvalInputError` (not an .npz, object arrays, bad meta JSON, shapes that do not fit together,
    non-finite values).
    """
    with open_npz(path, _REF_WHAT) as data:
        files = set(data.files)
        missing = {"mu", "sigma"} - files
        if missing:
            raise EvalKeyError(f"{path}: missing {sorted(missing)} (has {sorted(files)}); {_REF_WHAT}")
        if len({"mu_s", "sigma_s"} & files) == 1:
            raise EvalKeyError(f"{path}: has only one of mu_s/sigma_s (has {sorted(files)}); {_REF_WHAT}")
        try:
            meta = json.loads(str(read_npz_array(data, "meta", path, _REF_WHAT))) if "meta" in files else {}
        except json.JSONDecodeError as err:
            raise EvalInputError(f"{path}: 'meta' is not JSON ({err}); {_REF_WHAT}") from None
        feats = read_npz_array(data, "features", path, _REF_WHAT) if "features" in files else None
        mu, sigma = (read_npz_array(data, k, path, _REF_WHAT) for k in ("mu", "sigma"))
        spatial = ((read_npz_array(data, "mu_s", path, _REF_WHAT), read_npz_array(data, "sigma_s", path, _REF_WHAT))
                   if "mu_s" in files else None)
    if not isinstance(meta, dict):
        raise EvalInputError(f"{path}: 'meta' must be a JSON object; {_REF_WHAT}")
    mu, sigma = _check_stats(path, ("mu", "sigma"), mu, sigma)
    if feats is not None:
        if feats.dtype.kind not in "fiu":
            raise EvalInputError(f"{path}: 'features' must be numeric, got {feats.dtype}; {_REF_WHAT}")
        if feats.ndim != 2 or feats.shape[1] != mu.shape[0]:
            raise EvalInputError(f"{path}: shapes do not fit together (mu {mu.shape}, sigma {sigma.shape}, features "
                                 f"{feats.shape}); {_REF_WHAT}")
    mu_s, sigma_s = _check_stats(path, ("mu_s", "sigma_s"), *spatial) if spatial is not None else (None, None)
    return ReferenceStats(mu=mu, sigma=sigma, features=feats, meta=meta, mu_s=mu_s, sigma_s=sigma_s)


# --------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------


def inception_score(probs: ArrayLike, splits: int = 10, split_size: int | None = None) -> tuple[float, float]:
    """Inception Score of class probabilities, mean and standard deviation over chunks of the rows.

    For each chunk S: IS_S = exp( (1/|S|) Σ_{x∈S} Σ_y p(y|x) [log p(y|x) − log p_S(y)] ),
    p_S(y) = (1/|S|) Σ_{x∈S} p(y|x), with 0·log 0 = 0. The N rows are cut in order into consecutive
    chunks, so shuffle beforehand if the rows are sorted by class: ``splits`` nearly equal chunks
    (``np.array_split``, the improved-gan convention), or, with ``split_size``, rows [0, s), [s, 2s), ...
    with a shorter last chunk when s does not divide N (the ADM evaluator: s = 5000, so 50 000 samples
    give 10 chunks of 5000).

    Args:
        probs: (N, K) rows summing to 1 (e.g. softmax of classifier logits).
        splits: number of chunks, 1 ≤ splits ≤ N (ignored when ``split_size`` is given).
        split_size: rows per chunk (≥ 1), or None.

    Returns:
        ``(mean, std)`` of IS over the chunks (std is 0 for one chunk).
    """
    p = _as_numpy(probs)
    if p.ndim != 2:
        raise ValueError(f"probs must be (N, K), got shape {p.shape}")
    if split_size is not None:
        if split_size < 1:
            raise ValueError(f"split_size must be >= 1, got {split_size}")
        chunks = [p[i : i + split_size] for i in range(0, p.shape[0], split_size)]
    elif not 1 <= splits <= p.shape[0]:
        raise ValueError(f"splits must be in [1, N={p.shape[0]}], got {splits}")
    else:
        chunks = np.array_split(p, splits, axis=0)
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("probs must be non-negative rows summing to 1 (pass softmax(logits))")
    tiny = np.finfo(np.float64).tiny
    scores = []
    for chunk in chunks:
        marginal = chunk.mean(axis=0, keepdims=True)
        kl = chunk * (np.log(np.maximum(chunk, tiny)) - np.log(np.maximum(marginal, tiny)))
        scores.append(math.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------------
# Precision and recall (k-NN manifolds)
# --------------------------------------------------------------------------------------------


def _sq_dists(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (len(a), len(b)) as ‖a‖² + ‖b‖² − 2abᵀ, clipped at 0."""
    d = (a * a).sum(1, keepdim=True) + b_sq[None, :] - 2.0 * (a @ b.T)
    return d.clamp_min_(0.0)


def _knn_radii_sq(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Squared distance from each row of x to its k-th nearest *other* row (self excluded)."""
    if x.shape[0] <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {x.shape[0]}")
    x_sq = (x * x).sum(1)
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], batch_size):
        d = _sq_dists(x[start : start + batch_size], x, x_sq)
        rows = torch.arange(d.shape[0], device=x.device)
        d[rows, rows + start] = 0.0  # the point itself, exactly; it is the 1st of the k+1 smallest
        out[start : start + batch_size] = torch.topk(d, k + 1, dim=1, largest=False).values[:, k]
    return out


def _coverage(query: torch.Tensor, support: torch.Tensor, radii_sq: torch.Tensor, batch_size: int) -> float:
    """Fraction of query rows inside at least one ball B(support_i, radius_i) (closed balls)."""
    s_sq = (support * support).sum(1)
    inside = 0
    for start in range(0, query.shape[0], batch_size):
        d = _sq_dists(query[start : start + batch_size], support, s_sq)
        inside += int((d <= radii_sq[None, :]).any(dim=1).sum())
    return inside / query.shape[0]


def precision_recall(
    real_feats: ArrayLike,
    fake_feats: ArrayLike,
    k: int = 3,
    batch_size: int = 1024,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN manifolds.

    Manifold of a set X: ∪_i B(x_i, ρ_k(x_i)), ρ_k(x_i) the distance from x_i to its k-th nearest
    neighbour in X \\ {x_i}.

        precision = (1/M) Σ_j 1[fake_j ∈ manifold(real)]
        recall    = (1/N) Σ_i 1[real_i ∈ manifold(fake)]

    Distances are computed in row blocks of ``batch_size``, so memory is O(batch_size · max(N, M))
    (10k × 10k features need ~80 MB per block in float64, not 800 MB).

    Args:
        real_feats: (N, D) reference features.
        fake_feats: (M, D) generated features.
        k: neighbourhood size (3 in the paper).
        batch_size: rows per distance block.
        dtype: computation dtype (float64 keeps the distance of a point to itself at ~0).
        device: where the distances are computed (a GPU makes 50k x 50k sets practical).

    Returns:
        ``(precision, recall)``, each in [0, 1].
    """
    real = torch.as_tensor(_as_numpy(real_feats), dtype=dtype, device=device)
    fake = torch.as_tensor(_as_numpy(fake_feats), dtype=dtype, device=device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D), got {tuple(real.shape)}, {tuple(fake.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    real_r = _knn_radii_sq(real, k, batch_size)
    fake_r = _knn_radii_sq(fake, k, batch_size)
    precision = _coverage(fake, real, real_r, batch_size)
    recall = _coverage(real, fake, fake_r, batch_size)
    return precision, recall


# --------------------------------------------------------------------------------------------
# Class accuracy
# --------------------------------------------------------------------------------------------


@dataclass
class ClassAccuracy:
    """Overall and per-class accuracy.

    Attributes:
        overall: (1/N) Σ_n 1[pred_n = target_n].
        per_class: class id → accuracy over the samples whose target is that class (NaN if none).
        counts: class id → number of samples with that target.
    """

    overall: float
    per_class: dict[int, float]
    counts: dict[int, int]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN per-class entries become ``None``)."""
        return {
            "overall": self.overall,
            "per_class": {str(c): (None if math.isnan(a) else a) for c, a in self.per_class.items()},
            "counts": {str(c): n for c, n in self.counts.items()},
        }


def class_accuracy(
    pred_labels: ArrayLike, target_labels: ArrayLike, num_classes: int | None = None
) -> ClassAccuracy:
    """Accuracy of predicted labels against the labels the samples were generated for.

    Args:
        pred_labels: (N,) integer predictions (e.g. argmax of classifier logits).
        target_labels: (N,) integer target classes.
        num_classes: report classes 0..num_classes−1 (default: max label + 1); target labels outside
            that range are an :class:`EvalInputError`.
    """
    pred = _as_numpy(pred_labels, np.int64).reshape(-1)
    target = _as_numpy(target_labels, np.int64).reshape(-1)
    if pred.shape != target.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {target.shape}")
    if pred.size == 0:
        raise ValueError("empty label arrays")
    k = int(num_classes) if num_classes is not None else int(max(pred.max(), target.max())) + 1
    if num_classes is not None and (target.min() < 0 or target.max() >= k):
        raise EvalInputError(
            f"labels must lie in 0..{k - 1} (the classifier's {k} classes), got values from {int(target.min())} "
            f"to {int(target.max())}"
        )
    correct = pred == target
    per_class: dict[int, float] = {}
    counts: dict[int, int] = {}
    for c in range(k):
        mask = target == c
        counts[c] = int(mask.sum())
        per_class[c] = float(correct[mask].mean()) if counts[c] else float("nan")
    return ClassAccuracy(overall=float(correct.mean()), per_class=per_class, counts=counts)
