"""Process-group setup for ``torchrun`` and the small collective helpers the loop uses.

``torchrun --standalone --nproc_per_node=N -m deltafm train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK;
:func:`init_distributed` reads them and starts a process group (NCCL on GPU, gloo on CPU). Without them
the run is a single process and every helper here is a no-op.

Seeds per rank and stream come from :mod:`deltafm.seeding`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
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
