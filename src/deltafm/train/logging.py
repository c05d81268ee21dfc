"""Run logs (JSONL, TensorBoard, Weights & Biases), console messages, and throughput / MFU measurement.

Only rank 0 logs, through the run's :class:`~deltafm.train.runfolder.RunFolder`. ``log.jsonl`` gets one
JSON object per logged step (``step``, ``images``, loss parts, ``lam``, ``lr``, ``grad_norm``,
``images_per_s``, ``mfu``, ...); TensorBoard scalars go to ``tb/`` under the same names (the package
``tensorboard`` is needed for those; without it they are skipped with a note).

With ``log.wandb: true`` the same records go to Weights & Biases (optional package ``wandb``, the
``[wandb]`` extra): ``train/<name>`` for the metrics and ``event/<name>`` for the events, each row with
``step`` and ``images`` (the x axis of every chart is ``images``), and the resolved config once per start.
The W&B run id is kept in ``OUT/wandb_id.txt`` (written atomically by the run folder), so a resumed run
continues the same W&B run; W&B's own files go to ``OUT/wandb/`` (or ``$WANDB_DIR/wandb/``). The mode
(``log.wandb_mode``, which wins over ``WANDB_MODE``) defaults to ``offline``: nothing leaves the machine
unless ``log.wandb_mode=online``. :func:`check_backends` (called before anything is written) turns a
missing package into a :class:`~deltafm.train.config.ConfigError`.

MFU (model FLOPs utilisation) = achieved model FLOP/s / peak FLOP/s, with the achieved rate estimated as
``flops_per_sample * 3 * images_per_second`` (forward + backward ≈ 3 forwards) and the peak either given
or measured by :func:`measure_matmul_peak` (best of a few square matmuls in the training dtype).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import Config, ConfigError, LogConfig, config_to_dict

if TYPE_CHECKING:
    from .runfolder import RunFolder

__all__ = ["RunLogger", "WandbOptions", "WANDB_ID_FILE", "check_backends", "measure_matmul_peak", "mfu", "console"]

#: the file of the run folder that holds the W&B run id (a resumed run continues that W&B run)
WANDB_ID_FILE = "wandb_id.txt"


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


def _import_wandb() -> Any:
    """The ``wandb`` module, or a ConfigError saying how to install it."""
    try:
        import wandb
    except ImportError as e:
        raise ConfigError(
            f"config key 'log.wandb' is true but the package wandb cannot be imported ({e}): install it with "
            "pip install 'deltafm[wandb]' (or pip install wandb), or set log.wandb=false"
        ) from None
    return wandb


def check_backends(log: LogConfig) -> None:
    """Check, before anything is written, that the logging backends the config asks for can be used:
    ``log.wandb: true`` needs the package ``wandb`` (a :class:`ConfigError` otherwise). TensorBoard is
    not checked (it is in the ``[train]`` extra; without it its logs are skipped with a note)."""
    if log.wandb:
        _import_wandb()


@dataclass(frozen=True)
class WandbOptions:
    """Where and how a run logs to Weights & Biases (from the ``log.wandb_*`` keys)."""

    project: str = "deltafm"
    mode: str = "offline"  # online / offline / disabled
    name: str | None = None  # display name; None: the run folder's name
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config, logged once per start


def _new_run_id() -> str:
    """A fresh W&B run id: 8 random lower-case letters and digits (W&B's own style)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class _Wandb:
    """One W&B run per run folder: the id is read from (or written to) ``OUT/wandb_id.txt``."""

    def __init__(self, folder: RunFolder, opts: WandbOptions) -> None:
        wandb = _import_wandb()
        root = Path(folder.root)
        run_id = None
        if opts.mode != "disabled":
            path = root / WANDB_ID_FILE
            run_id = path.read_text(encoding="utf-8").strip() if path.is_file() else ""
            if not run_id:
                run_id = _new_run_id()
                folder.write_text(WANDB_ID_FILE, run_id + "\n")
        kwargs: dict[str, Any] = {"project": opts.project, "name": opts.name or root.name, "mode": opts.mode,
                                  "id": run_id, "resume": "allow" if run_id else None}
        if not os.environ.get("WANDB_DIR"):  # W&B's own files next to the rest of the run
            kwargs["dir"] = str(root)
        if not os.environ.get("WANDB_CONSOLE"):  # leave stdout/stderr (and the progress bar) alone
            kwargs["settings"] = wandb.Settings(console="off")
        try:
            self.run = wandb.init(**kwargs)
        except Exception as e:  # noqa: BLE001 - W&B raises several kinds (no API key, no network, ...)
            from .builders import SetupError

            raise SetupError(f"cannot start W&B logging (log.wandb_mode={opts.mode!r}): {e}; use "
                             "log.wandb_mode=offline (upload later with `wandb sync`) or log.wandb=false") from None
        self.run.config.update(opts.config, allow_val_change=True)
        self.run.define_metric("images")
        for prefix in ("train", "event"):
            self.run.define_metric(f"{prefix}/*", step_metric="images")

    def log(self, step: int, images: int, metrics: dict[str, Any], kind: str) -> None:
        row: dict[str, Any] = {"step": step, "images": images}
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                v = v.item() if v.numel() == 1 else v.tolist()
            if isinstance(v, bool) or v is None:
                continue
            if isinstance(v, int | float | str):
                row[f"{kind}/{k}"] = v
        self.run.log(row)

    def close(self) -> None:
        failed = sys.exc_info()[0] is not None  # closed while an error propagates (a NaN stop, a crash)
        self.run.finish(exit_code=1 if failed else 0)


class RunLogger:
    """Append-only JSONL log plus optional TensorBoard writer and W&B run; no-ops when ``enabled`` is False.

    ``wandb`` (options, or None for no W&B) needs the package; build the logger of a training run with
    :meth:`for_run`."""

    def __init__(self, folder: RunFolder, jsonl: bool = True, tensorboard: bool = True, enabled: bool = True,
                 wandb: WandbOptions | None = None):
        self.enabled = enabled
        self.out_dir = Path(folder.root)
        self._jsonl = None
        self._tb = None
        self._wandb: _Wandb | None = None
        if not enabled:
            return
        if wandb is not None:  # first: a W&B run that cannot start stops the run before the other writers open
            self._wandb = _Wandb(folder, wandb)
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
        if self._wandb is not None:
            self._wandb.log(int(step), int(images), metrics, kind)

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
        if self._wandb is not None:
            wb, self._wandb = self._wandb, None
            wb.close()

    @classmethod
    def for_run(cls, folder: RunFolder, cfg: Config, enabled: bool = True) -> RunLogger:
        """The logger of a training run with config ``cfg`` (JSONL, TensorBoard and W&B as ``cfg.log`` says)."""
        lg = cfg.log
        wandb = WandbOptions(lg.wandb_project, lg.wandb_mode, lg.wandb_name, config_to_dict(cfg)) if lg.wandb else None
        return cls(folder, jsonl=lg.jsonl, tensorboard=lg.tensorboard, enabled=enabled, wandb=wandb)


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
