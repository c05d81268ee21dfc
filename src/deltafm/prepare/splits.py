"""Train / held-out image splits for the trainers (``train-autoencoder``, ``train-encoder``).

A dataset with a test split (Fashion-MNIST, MNIST, digits; an image folder with a ``test/`` subfolder)
gives (train[:max_items], test[:heldout]). A folder without one is split once: a seeded permutation of
its items sets ``held_count(n)`` of them aside (each trainer decides how many, and what is too few), and
the training items are the rest, in their order, cut to ``max_items``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deltafm.data import load_dataset

__all__ = ["train_heldout_splits"]


def train_heldout_splits(dataset: str, root: str | None, opts: dict[str, Any], max_items: int | None, heldout: int,
                         generator: torch.Generator, held_count: Callable[[int], int]) -> tuple[Any, Any, str]:
    """(train, held-out) in-memory datasets and where the held-out items came from (module docstring)."""
    key = dataset.lower().replace("_", "-")
    if key != "folder" or (root is not None and (Path(root) / "test").is_dir()):
        train = load_dataset(dataset, root, "train", max_items=max_items, **opts)
        held = load_dataset(dataset, root, "test", max_items=heldout, **opts)
        return train, held, "test split"
    full = load_dataset(dataset, root, "train", **opts)
    n_held = held_count(len(full))
    perm = torch.randperm(len(full), generator=generator)
    held_idx, train_idx = perm[:n_held].sort().values, perm[n_held:].sort().values
    if max_items is not None:
        train_idx = train_idx[:max_items]
    return full.subset(train_idx), full.subset(held_idx), f"{n_held} training images set aside (seeded)"
