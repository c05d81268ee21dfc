"""scikit-learn's bundled 8x8 handwritten digits: a zero-install dataset for tests and quick runs.

``sklearn.datasets.load_digits`` ships 1797 gray 8x8 images with values 0..16 and labels 0..9. They are
mapped to uint8 pixels p = round(v · 255 / 16) (0 -> 0, 16 -> 255), so they share the image normalisation
of every other dataset (see :mod:`deltafm.data.datasets`).

Split (deterministic, no random numbers): item i is in "test" when i % 5 == 0 and in "train" otherwise,
giving 1437 train and 360 test items; "all" is the 1797 items in their original order. The bundled order
cycles through the digits, so both splits hold every class in about equal numbers.
"""

from __future__ import annotations

import numpy as np

from deltafm.data.datasets import DataError, ImageDataset

__all__ = ["DIGITS_TEST_EVERY", "digits_split_indices", "load_digits_dataset"]

#: Every DIGITS_TEST_EVERY-th item (index % DIGITS_TEST_EVERY == 0) is in the test split.
DIGITS_TEST_EVERY = 5


def digits_split_indices(num_items: int, split: str) -> np.ndarray:
    """Indices of ``split`` ("train", "test" or "all") among ``num_items`` items."""
    index = np.arange(num_items)
    if split == "all":
        return index
    if split == "test":
        return index[index % DIGITS_TEST_EVERY == 0]
    if split == "train":
        return index[index % DIGITS_TEST_EVERY != 0]
    raise DataError(f"unknown split {split!r}; expected 'train', 'test' or 'all'")


def load_digits_dataset(split: str = "train") -> ImageDataset:
    """Load the scikit-learn digits as uint8 images (N, 1, 8, 8), 10 classes."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - sklearn is in the [train] extra
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install 'deltafm[train]'") from err
    bunch = load_digits()
    values = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8), 0..16
    if values.min() < 0 or values.max() > 16:
        raise ValueError(f"unexpected digits value range [{values.min()}, {values.max()}]")
    pixels = np.rint(values * (255.0 / 16.0)).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    keep = digits_split_indices(len(labels), split)
    return ImageDataset.from_numpy(
        pixels[keep][:, None],
        labels[keep],
        num_classes=10,
        name="digits",
        class_names=tuple(str(d) for d in range(10)),
    )
