"""Reference batches in the format of the ADM evaluation suite (openai/guided-diffusion ``evaluations/``).

An ADM reference batch (``VIRTUAL_imagenet256_labeled.npz`` and its siblings) is an ``.npz`` holding

* ``arr_0``: uint8 images (N, H, W, 3), 10 000 of them in the published ImageNet batches: the
  reference manifold of precision/recall (ADM always computes their features);
* ``mu``, ``sigma``: mean and covariance of the Inception pool3 features of the whole dataset (FID);
* ``mu_s``, ``sigma_s``: the same for the 2023-d spatial features (sFID, see
  :mod:`deltafm.eval.inception`).

ADM uses the stored statistics when ``mu`` is present and otherwise computes all four from the images
of ``arr_0``. :func:`load_reference` does the same and also reads the files ``deltafm eval ref-stats``
writes (the same keys plus ``features`` and a JSON ``meta``; with ``--save-images`` they hold ``arr_0``
too and are complete ADM reference batches). :func:`inspect_reference` checks a file without running a
network, so bad input fails before any forward pass.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deltafm.eval.metrics import EvalInputError, EvalKeyError, ReferenceStats, open_npz, read_npz_array

__all__ = ["ReferenceInfo", "inspect_reference", "load_reference"]

REF_FORMAT = ("reference statistics must be an .npz written by `deltafm eval ref-stats` or an ADM reference batch "
              "(uint8 images (N, H, W, C) under arr_0 and/or float mu (D,), sigma (D, D), optional mu_s, sigma_s, "
              "features (N, D), meta JSON), read with allow_pickle=False")


@dataclass
class ReferenceInfo:
    """What a reference file holds, read without loading the images.

    Attributes:
        path: the file.
        has_stats: ``mu`` and ``sigma`` are present (``mu_s``/``sigma_s`` may be too).
        images_shape: shape of ``arr_0`` (N, H, W, C), or None when the file holds no images.
        meta_image_hw: the (H, W) recorded by ``ref-stats`` in ``meta["image_hw"]``, if any.
    """

    path: Path
    has_stats: bool
    images_shape: tuple[int, ...] | None
    meta_image_hw: tuple[int, int] | None = None

    @property
    def image_hw(self) -> tuple[int, int] | None:
        """(H, W) of the reference images: from ``arr_0``, else from the metadata, else None."""
        if self.images_shape is not None:
            return int(self.images_shape[1]), int(self.images_shape[2])
        return self.meta_image_hw


def _npy_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of member ``key`` of an .npz from its .npy header, without reading the data."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as err:
        raise EvalInputError(f"{path}: cannot read the header of {key!r} ({err}); {REF_FORMAT}") from None
    return tuple(int(s) for s in shape), dtype


def inspect_reference(path: str | os.PathLike, sample_hw: tuple[int, int] | None = None,
                      allow_mismatch: bool = False) -> ReferenceInfo:
    """Check a reference file's keys and image layout (no network, images not loaded).

    Args:
        path: the ``.npz``.
        sample_hw: (H, W) of the samples to be scored; reference images of another resolution are refused
            (FID between 256x256 references and 512x512 samples measures the resizing, not the model).
        allow_mismatch: accept another resolution.

    Raises:
        FileNotFoundError: no such file.
        EvalKeyError: neither statistics (``mu``, ``sigma``) nor images (``arr_0``); ``mu`` without ``sigma``
            or the reverse, or one of ``mu_s``/``sigma_s`` alone.
        EvalInputError: not an .npz; ``arr_0`` that is not uint8 (N, H, W, 1 or 3) with N >= 2; reference
            images of another resolution than the samples.
    """
    import json

    path = Path(path)
    with open_npz(path, REF_FORMAT) as data:
        files = set(data.files)
        meta_hw = None
        if "meta" in files:
            try:
                meta = json.loads(str(read_npz_array(data, "meta", path, REF_FORMAT)))
            except json.JSONDecodeError as err:
                raise EvalInputError(f"{path}: 'meta' is not JSON ({err}); {REF_FORMAT}") from None
            hw = meta.get("image_hw") if isinstance(meta, dict) else None
            if isinstance(hw, list) and len(hw) == 2 and all(isinstance(v, int) for v in hw):
                meta_hw = (hw[0], hw[1])
    stats = {"mu", "sigma"} & files
    for pair in ({"mu", "sigma"}, {"mu_s", "sigma_s"}):
        if len(pair & files) == 1:
            raise EvalKeyError(f"{path}: missing {sorted(pair - files)} (has {sorted(files)}); statistics come in "
                               f"pairs (mu with sigma, mu_s with sigma_s); {REF_FORMAT}")
    if not stats and "arr_0" not in files:
        raise EvalKeyError(f"{path}: holds neither statistics (mu, sigma) nor images (arr_0); has {sorted(files)}; "
                           f"{REF_FORMAT}")
    shape = None
    if "arr_0" in files:
        shape, dtype = _npy_header(path, "arr_0")
        if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3):
            hint = "; it looks like (N, C, H, W): transpose it to (N, H, W, C)" if len(shape) == 4 and \
                shape[1] in (1, 3) else ""
            raise EvalInputError(f"{path}: arr_0 is {dtype} {shape}, not uint8 (N, H, W, 1 or 3){hint}; {REF_FORMAT}")
        if shape[0] < 2:
            raise EvalInputError(f"{path}: arr_0 holds {shape[0]} image(s); a reference batch needs at least 2")
    info = ReferenceInfo(path, bool(stats), shape, meta_hw)
    ref_hw = info.image_hw
    if sample_hw is not None and ref_hw is not None and tuple(sample_hw) != ref_hw and not allow_mismatch:
        raise EvalInputError(
            f"{path}: reference images are {ref_hw[0]}x{ref_hw[1]} but the samples are {sample_hw[0]}x{sample_hw[1]}; "
            "use the reference batch of the samples' resolution (e.g. VIRTUAL_imagenet256_labeled.npz for 256x256 "
            "samples), or --allow-mismatch"
        )
    return info


def _read_images(path: Path) -> np.ndarray:
    with open_npz(path, REF_FORMAT) as data:
        return read_npz_array(data, "arr_0", path, REF_FORMAT)


def load_reference(
    path: str | os.PathLike,
    extractor=None,
    sample_hw: tuple[int, int] | None = None,
    allow_mismatch: bool = False,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = True,
    info: ReferenceInfo | None = None,
) -> ReferenceStats:
    """Reference statistics for :func:`~deltafm.eval.features.evaluate_samples` from an ADM reference batch
    or a ``ref-stats`` file.

    * ``mu``/``sigma`` (and ``mu_s``/``sigma_s`` when present) are used as stored, as ADM does;
    * without them they are computed from the images ``arr_0`` (with a progress bar);
    * the precision/recall features are the stored ``features`` when they were made with this
      ``extractor``, else the features of ``arr_0`` (ADM's reference manifold), else absent.

    ``extractor`` may be None only for a file that needs no network (statistics, and ``features`` or no
    images). The metadata records where each part came from (``stats_source``, ``features_source``).

    Raises what :func:`inspect_reference` and :func:`~deltafm.eval.metrics.load_reference_stats` raise.
    """
    from deltafm.eval.features import check_images, extract
    from deltafm.eval.metrics import feature_statistics, load_reference_stats

    path = Path(path)
    info = info or inspect_reference(path, sample_hw, allow_mismatch)
    ext_id = getattr(extractor, "extractor_id", None)
    if info.has_stats:
        ref = load_reference_stats(path)
        ref.meta.setdefault("stats_source", "file")
    else:
        ref = None
    stored_ok = ref is not None and ref.features is not None and ref.meta.get("extractor") in (None, ext_id)
    if ref is not None and (stored_ok or info.images_shape is None or extractor is None):
        if ref.features is not None:
            ref.meta.setdefault("features_source", "file")
        return ref
    if extractor is None:
        raise EvalInputError(f"{path}: computing reference features from arr_0 needs an extractor")
    images = _read_images(path)
    check_images(extractor, images, "NHWC", f"{path} arr_0", allow_mismatch=allow_mismatch)
    out = extract(extractor, images, batch_size, "NHWC", device, progress, desc="reference batch features")
    feats = out.features.astype(np.float32)
    if ref is not None:  # statistics from the file, manifold from the images (the ADM evaluator's way)
        ref.features = feats
        ref.meta["features_source"] = f"arr_0 ({len(images)} images, {ext_id})"
        return ref
    mu, sigma = feature_statistics(out.features)
    mu_s, sigma_s = feature_statistics(out.spatial) if out.spatial is not None else (None, None)
    meta = {"path": str(path), "extractor": ext_id, "count": int(len(images)), "feature_dim": int(feats.shape[1]),
            "image_hw": [int(images.shape[1]), int(images.shape[2])], "stats_source": "arr_0",
            "features_source": "arr_0"}
    return ReferenceStats(mu, sigma, feats, meta, mu_s=mu_s, sigma_s=sigma_s)
