"""Training batches: this rank's (x, y, extras) in the sampler's order, read ahead by worker processes if asked.

:class:`BatchLoader` turns the positions of an :class:`~deltafm.data.sampler.EpochBatchSampler` into
batches through the dataset's one batch method ``load_batch(index, generator, dtype)`` (in-memory
:class:`~deltafm.data.datasets.ImageDataset` or lazy :class:`~deltafm.data.latent_store.LatentStore`)::

    position (e, b)  ->  index = sampler.local_batch(e, b)                 this rank's items of global batch b
                     ->  g_{e,b} = Generator(derive_seed(seed, rank, "posterior@e.b"))
                     ->  x = dataset.load_batch(index, g_{e,b})           latents: (μ + σ·ε − shift)·scale
                         y = dataset.labels[index]
                         extras = dataset.load_extras(index, names)        only when ``extras`` names some
                     ->  Batch(x, y, extras), pinned, copied to the device with non_blocking=True

Every batch is a :class:`Batch` ``(x, y, extras)``; ``extras`` maps each asked name to a tensor whose
rows are the batch's items (REPA targets: ``"features.<e>"`` float32 (B, T, D), ``"images"`` uint8
(B, C, H, W); see :meth:`deltafm.data.latent_store.LatentStore.load_extras`) and is ``{}`` when none
are asked. Extras are read in the same call as x (so in the worker, pinned and copied like x), after
x's draw, and never touch g_{e,b}: x and y are bit-identical with and without extras.

Two rules make a run independent of how batches are loaded:

* **Draws.** The posterior draw ε of batch (e, b) comes from its own generator g_{e,b}, seeded from
  (train seed, rank, epoch e, batch b) by :func:`deltafm.seeding.derive_seed`, so the same batch gets the
  same ε whichever process loads it, with 0 or N workers, before or after a resume.
* **Position.** Loading walks :meth:`EpochBatchSampler.positions`, which does not move the sampler;
  each batch carries its position, and :meth:`BatchLoader.__next__` calls
  :meth:`EpochBatchSampler.consume` when it hands the batch to the caller (the training step). A
  checkpoint's ``sampler.state_dict()`` therefore counts only batches the step consumed, never the
  ``workers × prefetch`` batches in flight, and a resumed run reads on from the first unconsumed batch.

``workers = 0`` loads in the calling process, one batch when asked (no read-ahead). ``workers = N > 0``
uses a ``torch.utils.data.DataLoader`` over batch positions (``batch_size=None``) with N processes that
each keep ``prefetch`` batches loaded ahead, in order. Workers ignore SIGINT and SIGTERM (the training
loop's :class:`~deltafm.train.signals.StopFlag` decides when to stop and checkpoint) and are shut down by
:meth:`BatchLoader.close`. The DataLoader gets a private generator, so starting workers does not draw
from the global torch RNG that checkpoints save.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, NamedTuple

import torch
from torch import Tensor

from deltafm.data.datasets import DataError
from deltafm.data.sampler import EpochBatchSampler
from deltafm.seeding import derive_seed

__all__ = ["Batch", "BatchLoader", "batch_generator", "batches"]


class Batch(NamedTuple):
    """One training batch: x (B, ...) in model space, labels y (B,), and the asked REPA extras by name
    (``{}`` when none were asked). Unpacks as ``x, y, extras = batch``."""

    x: Tensor
    y: Tensor
    extras: dict[str, Tensor]


#: what a load returns: (position, x or the DataError that stopped it, y, extras)
_Loaded = tuple[tuple[int, int], "Tensor | DataError", "Tensor | None", dict[str, Tensor]]


def batch_generator(seed: int, rank: int, epoch: int, index: int) -> torch.Generator:
    """The CPU generator of the posterior draw of batch ``index`` of ``epoch`` on ``rank``:
    ``derive_seed(seed, rank, f"posterior@{epoch}.{index}")``."""
    return torch.Generator().manual_seed(derive_seed(seed, rank, f"posterior@{epoch}.{index}"))


class _Positions:
    """The DataLoader's sampler: the sampler's upcoming positions, counting how many were handed out."""

    def __init__(self, sampler: EpochBatchSampler) -> None:
        self._it = sampler.positions()
        self.issued = 0

    def __iter__(self) -> _Positions:
        return self

    def __next__(self) -> tuple[int, int]:
        self.issued += 1
        return next(self._it)


class _BatchSource(torch.utils.data.Dataset):
    """Map-style "dataset" of whole batches, indexed by position (epoch, batch_in_epoch)."""

    def __init__(self, dataset: Any, sampler: EpochBatchSampler, dtype: torch.dtype,
                 extras: tuple[str, ...] = ()) -> None:
        self.dataset = dataset
        # a private copy: workers compute indices from (seed, epoch), never from the live position
        self.order = EpochBatchSampler(sampler.num_items, sampler.batch_size, sampler.seed, sampler.rank,
                                       sampler.world_size, sampler.drop_last)
        self.dtype = dtype
        self.extras = extras

    def __getitem__(self, pos: tuple[int, int]) -> _Loaded:
        """(pos, x, y, extras); a :class:`DataError` (a damaged item) comes back in x's place, so the main
        process raises it with its own message (a DataLoader would wrap it in a worker traceback)."""
        epoch, index = pos
        o = self.order
        idx = o.local_batch(epoch, index)
        try:
            x = self.dataset.load_batch(idx, batch_generator(o.seed, o.rank, epoch, index), self.dtype)
            extras = self.dataset.load_extras(idx, self.extras) if self.extras else {}
        except DataError as e:
            return pos, e, None, {}
        y = self.dataset.labels.index_select(0, idx.to(self.dataset.labels.device))
        return pos, x, y, extras


def _identity(batch: Any) -> Any:
    return batch


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGINT / SIGTERM to the main process, which checkpoints and then closes them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class BatchLoader:
    """Endless :class:`Batch` es (x, y, extras) of ``dataset`` for this rank, in ``sampler``'s order
    (module docstring).

    Args:
        dataset: an object with ``load_batch(index, generator, dtype)``, ``labels`` and ``len`` (and
            ``load_extras(index, names)`` when ``extras`` are asked).
        sampler: the run's sampler; its position advances only as batches are taken from the loader.
        device: where batches go (None: where ``load_batch`` puts them). CUDA: pinned + non_blocking.
        dtype: dtype of x.
        workers: loader processes (0: load in this process, when asked).
        prefetch: batches each worker keeps loaded ahead (``workers > 0`` only).
        extras: names of the REPA extras to load with every batch (e.g. ``("features.dinov2-vitb14",)``;
            the dataset's ``extra_names`` lists them). Checked here: a name the dataset does not hold is
            the dataset's :class:`DataError` saying what it holds and what to run.

    Use as an iterator, and :meth:`close` it (or use it as a context manager) to stop the workers.
    """

    def __init__(
        self,
        dataset: Any,
        sampler: EpochBatchSampler,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        workers: int = 0,
        prefetch: int = 2,
        extras: Sequence[str] = (),
    ) -> None:
        if sampler.num_items != len(dataset):
            raise ValueError(f"sampler is for {sampler.num_items} items, dataset has {len(dataset)}")
        if workers < 0 or prefetch < 1:
            raise ValueError(f"need workers >= 0 and prefetch >= 1, got workers={workers}, prefetch={prefetch}")
        if workers and dataset.labels.device.type != "cpu":
            raise ValueError("loader workers read from CPU memory or disk; keep the dataset on the CPU "
                             "(or use workers=0 to gather on the device)")
        extras = tuple(extras)
        if len(set(extras)) != len(extras) or not all(isinstance(n, str) for n in extras):
            raise ValueError(f"extras must be distinct names, got {list(extras)}")
        if extras:
            _check_extras(dataset, extras)
        self.dataset, self.sampler = dataset, sampler
        self.device = torch.device(device) if device is not None else None
        self.workers, self.prefetch, self.extras = workers, prefetch, extras
        self._source = _BatchSource(dataset, sampler, dtype, extras)
        self._positions: _Positions | None = None
        self._it: Iterator[_Loaded] | None = None

    @property
    def issued(self) -> int:
        """Positions handed to the loading side so far (consumed + in flight)."""
        return 0 if self._positions is None else self._positions.issued

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = self._start()
        (epoch, index), x, y, extras = next(self._it)
        if isinstance(x, DataError):
            raise x
        assert y is not None
        self.sampler.consume(epoch, index)  # the step takes this batch: only now does the position move
        return self._to_device(x, y, extras)

    def _start(self) -> Iterator[_Loaded]:
        self._positions = _Positions(self.sampler)
        if self.workers == 0:
            return map(self._source.__getitem__, self._positions)
        s = self.sampler
        loader = torch.utils.data.DataLoader(
            self._source, batch_size=None, sampler=self._positions, num_workers=self.workers,
            prefetch_factor=self.prefetch, collate_fn=_identity, worker_init_fn=_ignore_stop_signals,
            pin_memory=self.device is not None and self.device.type == "cuda",
            generator=torch.Generator().manual_seed(derive_seed(s.seed, s.rank, "loader")),
        )  # fmt: skip
        return iter(loader)

    def _to_device(self, x: Tensor, y: Tensor, extras: dict[str, Tensor]) -> Batch:
        extras = dict(extras)
        if self.device is None or x.device == self.device:
            return Batch(x, y, extras)
        non_blocking = self.device.type == "cuda" and x.device.type == "cpu"
        if non_blocking and not x.is_pinned():
            x, y = x.pin_memory(), y.pin_memory()
            extras = {k: v.pin_memory() for k, v in extras.items()}
        return Batch(x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking),
                     {k: v.to(self.device, non_blocking=non_blocking) for k, v in extras.items()})

    def close(self) -> None:
        """Stop the worker processes (if any); the loader starts afresh from the sampler's position when
        iterated again."""
        it, self._it, self._positions = self._it, None, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def batches(
    dataset: Any,
    sampler: EpochBatchSampler,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    extras: Sequence[str] = (),
) -> Iterator[Batch]:
    """Endless :class:`Batch` es (x, labels, extras) in the sampler's order, loaded in this process: a
    :class:`BatchLoader` with ``workers=0`` (x in model space, of ``dtype``, on ``device``)."""
    return BatchLoader(dataset, sampler, device=device, dtype=dtype, extras=extras)


def _check_extras(dataset: Any, names: tuple[str, ...]) -> None:
    """Fail early, with the dataset's own message, when it cannot load extras ``names`` (a read of no items)."""
    load = getattr(dataset, "load_extras", None)
    if load is None:
        raise DataError(f"dataset {getattr(dataset, 'name', type(dataset).__name__)!r} carries no extras "
                        f"({', '.join(names)} asked)")
    load(torch.zeros(0, dtype=torch.long), names)
