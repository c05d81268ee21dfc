"""The training loop: data -> path sample -> model -> ΔFM objective -> AdamW, with EMA, checkpoints, logs.

The loop, on one screen (:func:`_train`; every write below the run folder goes through
:class:`~deltafm.train.runfolder.RunFolder`: an exclusive lock for the run's lifetime, atomic files,
crash-safe checkpoints, removal of a crashed run's debris)::

    run = setup_run(...)          # setup.py: validate and build everything, lock, resume; nothing written yet
    books = Bookkeeper(run)       # bookkeeping.py: open the folder, config.yaml, log, banner, progress bar
    while not run.finished:
        x, y, extras = next(data)  # data.BatchLoader: the sampler position moves only here
        with validation_disabled():
            stats = train_step(run, x, y, stop.requested, extras)  # step.py: one optimizer step, one sync
        books.after_step(stats)   # log window, progress bar, log records, sample grids
        if stats.stop: checkpoint "signal" and return "interrupted"
        checkpoint every train.ckpt_every steps
    final checkpoint and sample grid

What a checkpoint holds is :class:`deltafm.train.state.RunState`; :meth:`Run.snapshot` builds it and
:meth:`Run.resume` reads it back.

Randomness is explicit: the batch order comes from :class:`deltafm.data.EpochBatchSampler` (seed, global
position), a latent batch's posterior draw z = μ + σ·ε from a generator per batch seeded from (seed,
rank, epoch, batch) (:class:`deltafm.data.BatchLoader`, whose ``data.workers`` read ahead without moving
the saved position), and everything the objective draws (t, noise, label dropout, negatives) from one
``torch.Generator`` per rank seeded from (seed, rank). Checkpoints hold every RNG state and the sampler
position, so a resumed run on the same world size is bit-identical to an uninterrupted one; on a
different world size the order of global batches and the images-seen count are kept and per-rank
streams are re-derived.

Signals: SIGTERM / SIGINT finish the current step, write a checkpoint and return (a second signal
aborts at once). A non-finite loss raises :class:`NonFiniteLossError` before the optimizer step, so the
last checkpoint on disk stays the last good state.

Step times are host times from the start of a step to the end of its queued work; the host waits for
the device once per step (in the next step's reduction), so over a log window they add up to the
device time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltafm.checks import validation_disabled
from deltafm.data import BatchLoader

from .bookkeeping import Bookkeeper
from .builders import SetupError
from .config import Config
from .distributed import DistInfo, init_distributed, shutdown_distributed
from .runfolder import RunFolder
from .setup import Run, setup_run
from .signals import StopFlag
from .step import NonFiniteLossError, train_step

__all__ = ["NonFiniteLossError", "SetupError", "TrainResult", "train"]


@dataclass
class TrainResult:
    """What a finished (or interrupted) run produced."""

    out_dir: Path
    status: str  # "done" or "interrupted"
    step: int
    images_seen: int
    checkpoint: Path | None
    sample_grid: Path | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)


def train(cfg: Config, out_dir: str | Path, resume: str | None = None) -> TrainResult:
    """Run (or continue) training; see the module docstring. ``resume``: None, "auto" or a path."""
    cfg.validate()
    out_dir = Path(out_dir)
    threads_before = torch.get_num_threads()
    try:
        di = init_distributed(cfg.train.device)
    except RuntimeError as e:
        raise SetupError(f"cannot start on train.device={cfg.train.device!r}: {e}") from None
    ended = False
    try:
        with RunFolder(out_dir, enabled=di.is_main) as folder:  # the lock is given back however the run ends
            result = _train(cfg, folder, resume, di)
        ended = True
        return result
    finally:
        shutdown_distributed(wait=ended)
        torch.set_num_threads(threads_before)


def _train(cfg: Config, folder: RunFolder, resume: str | None, di: DistInfo) -> TrainResult:
    run = setup_run(cfg, folder, resume, di)  # everything that can fail on bad input; writes nothing
    books = Bookkeeper(run, resume)
    data = BatchLoader(run.dataset, run.sampler, device=di.device, workers=cfg.data.workers,
                       prefetch=cfg.data.prefetch, extras=_extra_names(run))
    with StopFlag() as stop, data:
        try:
            while not run.finished:
                t0 = time.perf_counter()
                x, y, extras = next(data)
                with validation_disabled():  # labels were checked at load time; checks would sync
                    stats = train_step(run, x, y, stop.requested, extras)
                books.after_step(stats, time.perf_counter() - t0)
                if stats.stop:
                    books.interrupted()
                    break
                books.checkpoint_if_due()
            else:
                books.finish()
        finally:
            books.close()
    if books.status == "done":
        run.say(f"done: step {run.step}, {run.images} images; checkpoint {run.last_checkpoint}"
                + (f"; samples {books.grid}" if books.grid else ""))
    return TrainResult(run.out_dir, books.status, run.step, run.images, run.last_checkpoint, books.grid, books.metrics)


def _extra_names(run: Run) -> tuple[str, ...]:
    """The per-item tensors each batch needs: REPA's targets and the conditioning's ids."""
    return ((run.targets.extra_names if run.targets else ())
            + (run.conditions.extra_names if run.conditions else ()))
