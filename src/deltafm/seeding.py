"""Reproducible randomness: one seed per (run seed, rank or item index, stream name).

Every stream of randomness in deltafm (a rank's training draws, an image's initial noise, an SDE
sampler's noise) gets its own seed mixed from ``(seed, index, stream)`` by numpy's ``SeedSequence``,
so streams are statistically unrelated yet reproducible, and adding a stream never shifts another.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

__all__ = ["derive_seed", "make_generator"]


def derive_seed(seed: int, rank: int = 0, stream: str = "") -> int:
    """A 63-bit seed mixed from (seed, rank, stream) by numpy's SeedSequence."""
    words = np.random.SeedSequence([int(seed), int(rank), zlib.crc32(stream.encode())]).generate_state(
        2, dtype=np.uint32
    )
    return ((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1)


def make_generator(seed: int, rank: int = 0, stream: str = "", device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`derive_seed`."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, rank, stream))
    return g
