"""Process-group setup for ``torchrun`` and the small collective helpers the loop uses.

``torchrun --standalone --nproc_per_node=N -m deltafm train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK;
:func:`init_distributed` reads them and starts a process group (NCCL on GPU, gloo on CPU). Without them
the run is a single process and every helper here is a no-op.

Seeds per rank and stream come from :mod:`deltafm.seeding`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from deltafm.errors import RelayedError, UserError

__all__ = [
    "device_option",
    "together",
    "DistInfo",
    "init_distributed",
    "shutdown_distributed",
    "available_cores",
    "set_threads",
    "all_reduce_sum",
    "broadcast_object",
    "all_gather_object",
    "barrier",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "cpu":
        return torch.device("cpu")
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device={pref!r} but CUDA is not available")
        return torch.device(pref if ":" in pref else f"cuda:{local_rank}")
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Start the process group when launched by torchrun (WORLD_SIZE > 1), else a single process.

    The backend is NCCL when the device is CUDA, gloo otherwise. Each rank uses ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(0, 1, 0, dev, None)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def shutdown_distributed(wait: bool = False) -> None:
    """Destroy the process group (no-op without one). ``wait``: a barrier first, so that after a normal end
    every rank tears down together; a rank that destroys its group while another still works (rank 0
    writing the last sample grid) can make gloo abort at exit ("terminate called without an active
    exception", seen under load). After an error no barrier is attempted: a peer may never reach it."""
    if dist.is_available() and dist.is_initialized():
        if wait and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def available_cores() -> int:
    """CPU cores this process may use (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def set_threads(world_size: int, threads: int | None = None, local_world_size: int | None = None) -> int:
    """``torch.set_num_threads``: ``threads`` if given, else cores // processes on this machine (>= 1).

    Two CPU ranks each using all cores were almost 3x slower per step than with the cores split.
    """
    local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    n = threads if threads is not None else max(1, available_cores() // max(1, local))
    torch.set_num_threads(n)
    return n


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op for one process); returns ``t``."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank (in-memory pickling between our own processes)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order."""
    if not _active():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _active():
        dist.barrier()


def device_option(name: str, world: int = 1, local_rank: int = 0, error: type[Exception] = ValueError) -> torch.device:
    """The torch device of a ``--device`` option (auto, cpu, cuda[:N]); under torchrun (world > 1) CUDA
    means ``cuda:LOCAL_RANK``. A device that cannot be used raises ``error`` (the command's own bad-input
    class) saying what to pass instead."""
    if name == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            raise error(f"--device {name!r} is not a device; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise error(f"--device {name}: CUDA is not available here; use --device cpu")
        if world > 1:
            if dev.index is not None:
                raise error(f"--device {name} under torchrun would put every rank on one GPU; use --device "
                            "cuda or auto (each rank uses cuda:LOCAL_RANK)")
            dev = torch.device("cuda", local_rank)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise error(f"--device {dev}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise error(f"--device {name!r}: use auto, cpu or cuda[:N]")
    return dev


def together(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on every rank; when it fails with bad input (a ``UserError``) on any rank, every rank
    raises the first failure as a :class:`~deltafm.errors.RelayedError` (printed by rank 0 only, once for
    the job). A barrier too. Without a process group: ``fn(*args)``, failures as RelayedError."""
    out, err = None, None
    try:
        out = fn(*args)
    except UserError as e:
        err = str(e)
    msgs = all_gather_object(err)
    for r, msg in enumerate(msgs):
        if msg is not None:
            raise RelayedError(msg if len(msgs) == 1 or r == 0 else f"rank {r}: {msg}") from None
    return out
