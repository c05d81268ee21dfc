"""What a checkpoint holds besides the weights: the typed run state and the random streams.

A checkpoint written by ``deltafm train`` stores the model weights (``model.safetensors``), the EMA
weights (``ema.safetensors``) and a state, a nested dict with these keys (the on-disk format of
:mod:`deltafm.train.checkpoint`, unchanged since version 1)::

    step          optimizer steps taken
    images_seen   images seen over all ranks (the run's progress)
    world_size    number of ranks that wrote it (per-rank RNG streams are kept only on the same world size)
    config        the resolved config (``config_to_dict``)
    data          the data record (:class:`~deltafm.train.builders.DataInfo` as a dict)
    optimizer     ``AdamW.state_dict()``
    scaler        ``GradScaler.state_dict()`` under fp16, else None
    sampler       the global position of :class:`~deltafm.data.EpochBatchSampler`
    rng           one dict per rank: torch_cpu, numpy, python, objective (the rank's generator), torch_cuda
    mean_target   the objective's running means, summed over ranks (for the bias correction ū)
    lam           λ at the last step
    reason        why it was written: periodic, final or signal

:class:`RunState` owns these keys: the loop builds one to save, and reads one back to resume.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from deltafm.seeding import derive_seed

__all__ = ["RunState", "CHECKPOINT_KEYS", "capture_rng", "restore_rng", "reseed_rng"]


@dataclass
class RunState:
    """The training state of a checkpoint (every key but the weights); field order is the key order."""

    step: int = 0
    images_seen: int = 0
    world_size: int = 1
    config: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    sampler: dict[str, Any] | None = None
    rng: list[dict[str, Any]] = field(default_factory=list)
    mean_target: dict[str, torch.Tensor] | None = None
    lam: float = 0.0
    reason: str = ""

    def to_checkpoint(self) -> dict[str, Any]:
        """The dict :func:`~deltafm.train.checkpoint.save_checkpoint` writes (keys in the order above)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> RunState:
        """Read a checkpoint's state; missing keys (a ``weights_only`` load drops optimizer and scaler)
        take their defaults, unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        st = cls(**{k: v for k, v in state.items() if k in known})
        st.step, st.images_seen, st.world_size = int(st.step), int(st.images_seen), int(st.world_size)
        st.rng = list(st.rng or [])
        return st

    def rng_of(self, rank: int, world_size: int) -> dict[str, Any] | None:
        """Rank ``rank``'s saved random streams, or None when the world size changed (re-derive them)."""
        if self.world_size == world_size and len(self.rng) == world_size:
            return self.rng[rank]
        return None


CHECKPOINT_KEYS = tuple(f.name for f in fields(RunState))


def capture_rng(gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    """This rank's random streams: torch (CPU, and CUDA on a GPU), numpy, python, the objective's ``gen``."""
    st: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "objective": gen.get_state(),
    }
    if device.type == "cuda":
        st["torch_cuda"] = torch.cuda.get_rng_state(device)
    return st


def restore_rng(st: dict[str, Any], gen: torch.Generator, device: torch.device) -> None:
    """Inverse of :func:`capture_rng` (the python state comes back from JSON with lists for tuples)."""
    torch.set_rng_state(st["torch_cpu"])
    np.random.set_state(st["numpy"])
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    gen.set_state(st["objective"])
    if device.type == "cuda" and "torch_cuda" in st:
        torch.cuda.set_rng_state(st["torch_cuda"], device)


def reseed_rng(seed: int, rank: int, images: int, gen: torch.Generator) -> None:
    """Fresh, reproducible streams for a rank that has no saved state (first start or new world size)."""
    s = derive_seed(seed, rank, f"global@{images}")
    torch.manual_seed(s)
    np.random.seed(s % (2**32))
    random.seed(s)
    gen.manual_seed(derive_seed(seed, rank, f"objective@{images}"))
