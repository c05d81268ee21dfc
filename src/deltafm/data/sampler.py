"""A deterministic, resumable batch order for single- and multi-process training.

Order. Epoch e uses the permutation π_e = randperm(N) drawn from a ``torch.Generator`` seeded with
:func:`epoch_seed` (seed, e), a 64-bit number that numpy's ``SeedSequence`` mixes from the pair, so
nearby seeds or epochs give unrelated permutations. Global batch b of epoch e is
π_e[b·B : (b+1)·B] (B = global ``batch_size``). With ``drop_last`` the trailing N mod B items of each
epoch are skipped (a fresh permutation next epoch gives them their turn); without it the last, smaller
global batch is kept.

Ranks. The global batch is cut into ``world_size`` contiguous chunks; rank r gets chunk r, i.e.
B / world_size items of every full batch, and the union over ranks is the global batch. The order
depends on (seed, N, B) only, never on world_size or rank.

Resume. The position is global: (epoch, batch_in_epoch) counts *global* batches already handed out.
``state_dict()`` after consuming k batches of an epoch says batch_in_epoch = k, and a sampler loaded with
it yields global batch k next, with any world size, so a run resumed on a different number of processes
continues with the same sequence of global batches.

The sampler is an endless stream that rolls over epochs; take as many batches as the run needs.
Iterating it advances the position as batches are handed out. A loader that reads ahead
(:class:`deltafm.data.loader.BatchLoader`) instead walks :meth:`EpochBatchSampler.positions`, which does
not move the position, and calls :meth:`EpochBatchSampler.consume` when the training step takes a batch,
so the saved position never counts prefetched batches. Turning indices into (x, y) batches is
:mod:`deltafm.data.loader` (``BatchLoader``, ``batches``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["EpochBatchSampler", "epoch_seed"]


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed mixed from (seed, epoch) by numpy's SeedSequence (stable across versions)."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    words = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1)


class EpochBatchSampler:
    """Yields this rank's index tensors (int64) of each global batch, epoch after epoch, forever.

    Args:
        num_items: dataset size N.
        batch_size: the *global* batch size B, divisible by ``world_size``.
        seed: non-negative seed of the order.
        rank, world_size: this process and the number of processes.
        drop_last: skip the trailing incomplete batch of each epoch (default). Without it the last global
            batch is smaller and is split with ``torch.tensor_split``: ranks may then get unequal (or
            empty) chunks.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(f"global batch_size {batch_size} is not divisible by world_size {world_size}")
        if drop_last and batch_size > num_items:
            raise ValueError(
                f"batch_size {batch_size} > num_items {num_items} with drop_last: an epoch would have no batch"
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.batch_in_epoch = 0
        self._perm_epoch: int | None = None
        self._perm: torch.Tensor | None = None

    # ------------------------------------------------------------------ order
    @property
    def batches_per_epoch(self) -> int:
        """Global batches per epoch: floor(N / B) with drop_last, else ceil(N / B)."""
        full, rest = divmod(self.num_items, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    @property
    def local_batch_size(self) -> int:
        """Items per rank in a full global batch, B / world_size."""
        return self.batch_size // self.world_size

    def permutation(self, epoch: int) -> torch.Tensor:
        """π_epoch, the order of all N items in ``epoch`` (cached for the current epoch)."""
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            self._perm = torch.randperm(self.num_items, generator=g)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def global_batch(self, epoch: int, index: int) -> torch.Tensor:
        """All indices of global batch ``index`` of ``epoch`` (the same on every rank)."""
        if not 0 <= index < self.batches_per_epoch:
            raise IndexError(f"batch {index} out of range [0, {self.batches_per_epoch})")
        return self.permutation(epoch)[index * self.batch_size : (index + 1) * self.batch_size]

    def local_batch(self, epoch: int, index: int) -> torch.Tensor:
        """This rank's chunk of global batch ``index`` of ``epoch``."""
        return torch.tensor_split(self.global_batch(epoch, index), self.world_size)[self.rank].clone()

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Endless stream of local batches from the current position; the position advances as batches
        are handed out, so ``state_dict()`` taken between two batches resumes exactly there."""
        while True:
            if self.batch_in_epoch >= self.batches_per_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
            batch = self.local_batch(self.epoch, self.batch_in_epoch)
            self.batch_in_epoch += 1
            yield batch

    def positions(self) -> Iterator[tuple[int, int]]:
        """Endless (epoch, batch_in_epoch) of the batches that come next, from the current position on,
        rolling over epochs; does **not** move the position (see :meth:`consume`)."""
        epoch, index = self.epoch, self.batch_in_epoch
        while True:
            if index >= self.batches_per_epoch:
                epoch, index = epoch + 1, 0
            yield epoch, index
            index += 1

    def consume(self, epoch: int, index: int) -> None:
        """Record that batch ``index`` of ``epoch`` was used: the position becomes (epoch, index + 1),
        exactly what iterating would have left after handing that batch out."""
        self.epoch, self.batch_in_epoch = epoch, index + 1

    # ------------------------------------------------------------------ progress and resume
    @property
    def global_step(self) -> int:
        """Global batches handed out so far (over all epochs)."""
        return self.epoch * self.batches_per_epoch + self.batch_in_epoch

    @property
    def items_seen(self) -> int:
        """Items handed out so far over all ranks (exact, also with a smaller last batch)."""
        per_epoch = self.batches_per_epoch * self.batch_size if self.drop_last else self.num_items
        return self.epoch * per_epoch + min(self.batch_in_epoch * self.batch_size, per_epoch)

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch``."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch, self.batch_in_epoch = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        """The global position: {"epoch", "batch_in_epoch", "seed"} plus "num_items" and "batch_size"
        (checked on load, since a different N or B would make a different sequence)."""
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.seed,
            "num_items": self.num_items,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position (any rank / world size). Adopts the saved seed.

        Raises:
            ValueError: the state was made with a different num_items or batch_size (when recorded), or an
                out-of-range position.
        """
        for key in ("num_items", "batch_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this sampler has {getattr(self, key)}; "
                    "the batch sequence would differ"
                )
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or not 0 <= batch <= self.batches_per_epoch:
            raise ValueError(f"invalid sampler position epoch={epoch}, batch_in_epoch={batch}")
        if int(state["seed"]) < 0:
            raise ValueError(f"seed must be >= 0, got {state['seed']}")
        self.seed = int(state["seed"])
        self.epoch, self.batch_in_epoch = epoch, batch
        self._perm_epoch, self._perm = None, None

