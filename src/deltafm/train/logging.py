"""Run logs (JSONL + TensorBoard), console messages, and throughput / MFU measurement.

Only rank 0 logs, through the run's :class:`~deltafm.train.runfolder.RunFolder`. ``log.jsonl`` gets one
JSON object per logged step (``step``, ``images``, loss parts, ``lam``, ``lr``, ``grad_norm``,
``images_per_s``, ``mfu``, ...); TensorBoard scalars go to ``tb/`` under the same names (the package
``tensorboard`` is needed for those; without it they are skipped with a note).

MFU (model FLOPs utilisation) = achieved model FLOP/s / peak FLOP/s, with the achieved rate estimated as
``flops_per_sample * 3 * images_per_second`` (forward + backward ≈ 3 forwards) and the peak either given
or measured by :func:`measure_matmul_peak` (best of a few square matmuls in the training dtype).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .runfolder import RunFolder

__all__ = ["RunLogger", "measure_matmul_peak", "mfu", "console"]


def console(msg: str, *, enabled: bool = True) -> None:
    """Print a message line to stderr (rank 0 only: pass ``enabled=is_main``)."""
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    return v


class RunLogger:
    """Append-only JSONL log plus optional TensorBoard writer; no-ops when ``enabled`` is False."""

    def __init__(self, folder: RunFolder, jsonl: bool = True, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.out_dir = Path(folder.root)
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        if jsonl:
            self._jsonl = folder.append("log.jsonl")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # pragma: no cover - tensorboard is in the [train] extra
                console("note: tensorboard is not installed; TensorBoard logs are off")
            else:
                self._tb = SummaryWriter(str(self.out_dir / "tb"))

    def log(self, step: int, images: int, metrics: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step), "images": int(images), "time": round(time.time(), 3)}
        record.update({k: _jsonable(v) for k, v in metrics.items()})
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k in ("step", "images", "time", "kind") or not isinstance(v, int | float) or isinstance(v, bool):
                    continue
                self._tb.add_scalar(f"{kind}/{k}", v, global_step=int(images))

    def event(self, step: int, images: int, message: str, **extra: Any) -> None:
        """A non-metric record (checkpoint written, interrupted, ...)."""
        self.log(step, images, {"message": message, **extra}, kind="event")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_matmul_peak(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, size: int | None = None,
    seconds: float = 0.25,
) -> float:
    """Best observed FLOP/s of an ``n x n @ n x n`` matmul (2 n³ FLOPs) on ``device`` in ``dtype``.

    A short empirical peak for MFU: n = 512 on CPU, 8192 on GPU. Runs about
    ``seconds`` after a warm-up and returns the fastest repetition.
    """
    device = torch.device(device)
    n = size or (8192 if device.type == "cuda" else 512)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.float32, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, dtype=torch.float32, generator=g).to(dtype)
    torch.mm(a, b)
    _sync(device)
    best = math.inf
    start = time.perf_counter()
    reps = 0
    while reps < 3 or (time.perf_counter() - start < seconds and reps < 200):
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2.0 * n**3 / best


def mfu(flops_per_sample: float | None, images_per_s: float, peak_flops_total: float) -> float | None:
    """Model FLOPs utilisation: ``3 * flops_per_sample * images_per_s / peak`` (None if unknown)."""
    if not flops_per_sample or peak_flops_total <= 0:
        return None
    return 3.0 * flops_per_sample * images_per_s / peak_flops_total
