"""A run of ``deltafm train-autoencoder``, from the settings to ``OUT/vae``; crash-safe and resumable.

    OUT/checkpoints/step_X/   model, EMA, optimizer, data position, random streams (atomic folders)
    OUT/samples/step_X.png    held-out originals over their reconstructions (EMA weights), every grid_every
    OUT/recon.png             the same at the end
    OUT/metrics.json          the log (loss terms, train PSNR, lr, images/s) and the held-out evaluations
    OUT/vae/                  the EMA weights, ``AutoencoderKL.save_pretrained`` (config.json with the
                              measured scaling_factor / shift_factor + safetensors); load_autoencoder(OUT/vae)
    OUT/autoencoder.json      written last: settings, data preparation, metrics, identity, scale

Order: check the settings, load the data, build the feature network and the model (nothing written yet);
lock OUT (:class:`deltafm.train.runfolder.RunFolder`) and choose the checkpoint (``--resume auto``: the
newest valid one; without it a folder holding checkpoints or a finished run is an error); restore; then
write. SIGTERM / SIGINT (:class:`deltafm.train.signals.StopFlag`) finish the step, write a checkpoint
and return ``interrupted``; ``--resume auto`` continues bit-exactly (same weights, optimizer moments,
data order and posterior draws as an uninterrupted run on the same machine and thread count).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltafm.atomic import fsync_dir
from deltafm.images import save_grid
from deltafm.seeding import make_generator
from deltafm.train.runfolder import RunFolder
from deltafm.train.signals import StopFlag
from deltafm.vae import Autoencoder, load_autoencoder, vae_identity

from .autoencoder_config import AutoencoderSettings, TrainAutoencoderError, check_settings
from .autoencoder_data import Fitted, load_autoencoder_data
from .autoencoder_eval import FeatureSet, heldout_metrics, latent_statistics, psnr, recon_grid, reconstruct
from .autoencoder_train import Trainer, build_trainer
from .settings_checks import resolve_device

__all__ = ["RunResult", "train_autoencoder", "DONE_FILE"]

DONE_FILE = "autoencoder.json"
QUICK_EVAL_ITEMS = 256
Say = Callable[[str], None]


@dataclass
class RunResult:
    """How a run ended: ``done`` (OUT/vae written now), ``finished`` (it was already), ``interrupted``."""

    status: str
    out: Path
    step: int
    record: dict[str, Any] | None = None
    signum: int | None = None


def _say_default(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stderr)


def _finished(out: Path, resume: str | None) -> dict[str, Any] | None:
    """The record of a finished run in ``out`` (with ``--resume auto``); without it, an error."""
    done = out / DONE_FILE
    if not done.is_file():
        return None
    if resume is None:
        raise TrainAutoencoderError(f"{out} already holds a finished autoencoder ({done}, {out / 'vae'}); "
                                    "choose another --out (or pass --resume auto to leave it as it is)")
    try:
        return json.loads(done.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainAutoencoderError(f"{done} is not readable JSON ({e}); move {out} away") from None


def train_autoencoder(s: AutoencoderSettings, out: str | os.PathLike, resume: str | None = None,
                      on_step: Callable[[int], None] | None = None, say: Say | None = None) -> RunResult:
    """Train (or continue, ``resume="auto"``) the autoencoder of ``s`` into ``out``.

    ``on_step(step)`` is called after every optimizer step (tests use it to send a signal mid-run)."""
    say = say or _say_default
    out = Path(out)
    if resume not in (None, "auto"):
        raise TrainAutoencoderError(f"--resume takes 'auto', got {resume!r}")
    check_settings(s)
    if (record := _finished(out, resume)) is not None:
        say(f"{out} already holds a finished autoencoder ({out / 'vae'}); nothing to do")
        return RunResult("finished", out, int(record.get("train", {}).get("steps", 0)), record)
    if out.exists() and not out.is_dir():
        raise TrainAutoencoderError(f"--out {out} is a file, not a folder")
    device = resolve_device(s.device, TrainAutoencoderError)
    fitted = load_autoencoder_data(s)
    features = FeatureSet(s.extractor, fitted, device)
    trainer = build_trainer(s, fitted, device)
    with RunFolder(out) as folder:
        folder.lock()
        ckpt = folder.checkpoint_to_resume(resume, say)
        if ckpt is not None:
            trainer.restore(ckpt)
            say(f"resuming from {ckpt} (step {trainer.step} of {s.steps})")
        folder.open(say)
        with StopFlag() as stop:
            _train_steps(trainer, folder, stop, on_step, say)
            if stop.requested:
                return _interrupted(trainer, out, stop, say)
            record = _export(trainer, folder, features, stop, say)
            if record is None:
                return _interrupted(trainer, out, stop, say)
    return RunResult("done", out, trainer.step, record)


def _interrupted(t: Trainer, out: Path, stop: StopFlag, say: Say) -> RunResult:
    saved = "a checkpoint is saved: continue" if t.step else "nothing was trained yet: start again"
    say(f"stopped at step {t.step} of {t.s.steps} (signal {stop.signum}); {saved} with the same options and "
        f"--resume auto --out {out}")
    return RunResult("interrupted", out, t.step, None, stop.signum)


# ----------------------------------------------------------------------------------------------------
# The steps
# ----------------------------------------------------------------------------------------------------


class _Window:
    """Means of the step numbers since the last log record, and the images per second."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.n, self.images, self.seconds = 0, 0, 0.0

    def add(self, stats: dict[str, float], images: int, seconds: float) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n, self.images, self.seconds = self.n + 1, self.images + images, self.seconds + seconds

    @property
    def rate(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def record(self, t: Trainer) -> dict[str, Any]:
        """The log record of the window (means of the step numbers; images/s of the wall time), then reset."""
        rec: dict[str, Any] = {"step": t.step, "images_seen": t.images_seen}
        rec.update({k: v / max(self.n, 1) for k, v in self.sums.items()})
        rec["images_per_s"] = self.rate
        self.reset()
        return rec


def _train_steps(t: Trainer, folder: RunFolder, stop: StopFlag, on_step: Callable[[int], None] | None,
                 say: Say) -> None:
    """Steps until ``steps`` or a signal; logs, grids and checkpoints on their schedules."""
    from tqdm.auto import tqdm

    s = t.s
    bar = tqdm(total=s.steps, initial=t.step, unit="step", desc="autoencoder", dynamic_ncols=True,
               disable=not s.progress, file=sys.stderr)
    window, it, held_psnr, saved = _Window(), iter(t.sampler), None, t.step
    try:
        while t.step < s.steps and not stop.requested:
            start = time.perf_counter()
            stats = t.take_step(t.batch(it))
            elapsed = time.perf_counter() - start
            t.seconds += elapsed
            window.add(stats, s.batch_size, elapsed)
            rate, last = window.rate, t.step == s.steps
            if t.step % s.log_every == 0 or last:
                t.history.append(window.record(t))
            if t.step % s.grid_every == 0 or last:
                held_psnr = _quick_eval(t, folder)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", psnr=f"{stats['train_psnr_db']:.1f}",
                            held=f"{held_psnr:.2f}" if held_psnr is not None else "-",
                            img_s=f"{rate:.0f}")
            if on_step is not None:
                on_step(t.step)
            if t.step % s.checkpoint_every == 0 or last or stop.requested:
                _checkpoint(t, folder, "final" if last else "signal" if stop.requested else "periodic")
                saved = t.step
        if stop.requested and saved != t.step:  # the signal came after the step's checkpoint decision
            _checkpoint(t, folder, "signal")
    finally:
        bar.close()


def _checkpoint(t: Trainer, folder: RunFolder, reason: str) -> None:
    folder.save_checkpoint(t.step, t.model.state_dict(), t.state(reason), ema=t.ema.state_dict(),
                           keep_last=t.s.keep_last)


def _quick_eval(t: Trainer, folder: RunFolder) -> float:
    """Held-out PSNR of the EMA weights on the first few held-out images, a recon grid, metrics.json."""
    held = t.fitted.heldout[:QUICK_EVAL_ITEMS]
    recon = reconstruct(t.ema.module, held, t.device)
    value = psnr(held, recon, t.fitted)
    t.evals.append({"step": t.step, "images_seen": t.images_seen, "heldout_psnr_db": value,
                    "items": int(held.shape[0])})
    _write_grid(folder, f"samples/step_{t.step:08d}.png", held, recon)
    _write_metrics(folder, t, None)
    return value


def _write_grid(folder: RunFolder, name: str, originals: torch.Tensor, recon: torch.Tensor) -> None:
    n = min(16, originals.shape[0])
    tiles = recon_grid(originals[:n], recon[:n])
    folder.write_file(name, lambda p: save_grid(tiles, p, ncol=min(8, n)))


def _write_metrics(folder: RunFolder, t: Trainer, final: dict[str, Any] | None) -> None:
    doc = {"final": final, "evals": t.evals, "history": t.history}
    folder.write_text("metrics.json", json.dumps(doc, indent=1, allow_nan=False) + "\n")


# ----------------------------------------------------------------------------------------------------
# The end: held-out metrics, the latent scale, OUT/vae, autoencoder.json
# ----------------------------------------------------------------------------------------------------


def _save_vae(root: Path, vae: torch.nn.Module) -> Path:
    """``vae.save_pretrained`` into a temporary sibling, fsync'ed, renamed to ``root/vae`` (an older
    ``vae`` is renamed away first, then deleted): a crash leaves the old folder, the new one, or debris."""
    final, tmp = root / "vae", root / f".tmp-{os.getpid()}-vae"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(str(tmp), safe_serialization=True)
    for p in tmp.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():
        gone = root / f".del-vae-{os.getpid()}"
        os.replace(final, gone)
        shutil.rmtree(gone, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(root)
    return final


def _scale(t: Trainer) -> tuple[float, float | None, float, float]:
    """(scaling_factor, shift_factor, m, √Var z) from the first ``scale_items`` training images."""
    ae = Autoencoder(t.ema.module, "training", 1.0, 0.0, "unsaved")
    mean, std = latent_statistics(ae, t.fitted.train[:t.s.scale_items])
    if not (math.isfinite(std) and std > 0):
        raise TrainAutoencoderError(f"the latents have std {std}: the training diverged; lower --lr")
    return 1.0 / std, (mean if t.s.shift else None), mean, std


def _export(t: Trainer, folder: RunFolder, features: FeatureSet, stop: StopFlag, say: Say) -> dict[str, Any] | None:
    """The final evaluation and the saved VAE; None when a signal arrived on the way (nothing final written)."""
    s, vae = t.s, t.ema.module
    metrics, recon = heldout_metrics(vae, t.fitted, features, t.device,
                                     make_generator(s.seed, 0, "autoencoder-eval", t.device))
    _write_grid(folder, "recon.png", t.fitted.heldout, recon)
    if stop.requested:
        return None
    scale, shift, mean, std = _scale(t)
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    identity = vae_identity(vae)
    path = _save_vae(folder.root, vae)
    loaded = load_autoencoder(path)
    if loaded.identity != identity:  # pragma: no cover - would be a bug in saving or loading
        raise RuntimeError(f"{path} loads with identity {loaded.identity}, saved {identity}")
    record = _record(t, metrics, identity, scale, shift, mean, std, loaded)
    _write_metrics(folder, t, metrics)
    folder.write_text(DONE_FILE, json.dumps(record, indent=1, allow_nan=False) + "\n")
    shape = "x".join(map(str, loaded.latent_shape(t.fitted.image_size)))
    say(f"wrote {path} ({identity}): held-out PSNR {metrics['psnr_db']:.2f} dB, rFD {metrics['rfd']:.4g} "
        f"({metrics['rfd_features']}), scaling_factor {scale:.6g}, latents {shape}")
    return record


def _record(t: Trainer, metrics: dict[str, Any], identity: str, scale: float, shift: float | None, mean: float,
            std: float, ae: Autoencoder) -> dict[str, Any]:
    import diffusers

    fitted: Fitted = t.fitted
    return {
        "format": "deltafm.autoencoder", "version": 1, "vae": "vae", "class": "AutoencoderKL", "identity": identity,
        "scaling_factor": scale, "shift_factor": shift, "latent_mean": mean, "latent_std": std,
        "scale_items": int(min(t.s.scale_items, fitted.train.shape[0])),
        "image_shape": [fitted.channels, fitted.image_size, fitted.image_size],
        "latent_shape": list(ae.latent_shape(fitted.image_size)), "downsample": ae.downsample,
        "parameters": sum(p.numel() for p in ae.vae.parameters()),
        "data": fitted.record(), "metrics": metrics,
        "train": {"steps": t.step, "images_seen": t.images_seen, "step_seconds": t.seconds,
                  "last_log": t.history[-1] if t.history else None},
        "settings": t.s.to_dict(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
