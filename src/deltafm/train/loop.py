"""The training loop: data -> path sample -> model -> ΔFM objective -> AdamW, with EMA, checkpoints, logs.

One optimizer step, for a global batch of B images split over W ranks and A accumulation micro-steps::

    for each micro-batch (B / (W·A) images on this rank):
        with autocast(precision):  loss = DeltaFMObjective(model, x1, y, generator=g_rank, progress=images)
        (loss / A).backward()                       # DDP all-reduces gradients on the last micro-step
    ‖g‖ = clip_grad_norm_(params, grad_clip)        # unscaled first under fp16
    stop if any rank saw a non-finite loss (or grad norm, outside fp16)   -> NonFiniteLossError
    lr = optim.lr · min(1, images / warmup_images);  AdamW step;  images += B;  EMA update

Randomness is explicit: the batch order comes from :class:`deltafm.data.EpochBatchSampler` (seed, global
position) and everything the objective draws (t, noise, label dropout, negatives) from one
``torch.Generator`` per rank seeded from (seed, rank). Checkpoints hold every RNG state and the sampler
position, so a resumed run on the same world size is bit-identical to an uninterrupted one; on a
different world size the order of global batches and the images-seen count are kept and per-rank
streams are re-derived.

Signals: SIGTERM / SIGINT finish the current step, write a checkpoint and return (a second signal
aborts at once). A non-finite loss raises :class:`NonFiniteLossError` before the optimizer step, so the
last checkpoint on disk stays the last good state.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deltafm.objective import DeltaFMObjective
from deltafm.schedules import LambdaSchedule

from .checkpoint import (
    Checkpoint,
    CheckpointError,
    PickleCheckpointError,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    set_aside_newer,
)
from .config import Config, ConfigError, config_from_dict, config_to_dict, diff_configs, format_config
from .distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    derive_seed,
    init_distributed,
    set_threads,
    shutdown_distributed,
)
from .ema import EMA
from .logging import RunLogger, console, measure_matmul_peak, mfu

__all__ = [
    "SetupError",
    "NonFiniteLossError",
    "TrainResult",
    "DataInfo",
    "train",
    "build_objective",
    "build_model_for",
    "load_training_data",
]

_PRECISION = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class SetupError(RuntimeError):
    """The run cannot start (missing data, a model that cannot take the data, an occupied run folder)."""


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/Inf; the run stopped before the optimizer step."""


@dataclass
class DataInfo:
    """What a model needs to know about its data (stored in checkpoints for ``deltafm sample``)."""

    name: str
    kind: str
    channels: int
    image_size: int
    num_classes: int
    num_items: int
    class_names: list[str] | None = None
    latent_scale: float = 1.0
    latent_shift: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataInfo:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


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


# ----------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------


def load_training_data(cfg: Config):
    """Load the configured dataset; missing files become a :class:`SetupError` saying what is expected."""
    from deltafm.data import load_dataset

    d = cfg.data
    try:
        return load_dataset(d.name, root=d.root, split=d.split, image_size=d.image_size, channels=d.channels,
                            max_items=d.max_items)
    except FileNotFoundError as e:
        raise SetupError(f"data.name={d.name!r}, data.root={d.root!r}: {e}") from None
    except (ValueError, OSError) as e:
        raise SetupError(f"cannot load data (data.name={d.name!r}, data.root={d.root!r}): {e}") from None


def build_model_for(cfg: Config, info: DataInfo, seed: int | None = None, check: bool = True) -> nn.Module:
    """Build ``cfg.model`` for the data; a model that cannot take the data is a :class:`SetupError`.

    Initialisation draws from the global torch RNG under ``seed`` (restored afterwards), so every rank
    builds the same weights. ``check`` runs one forward pass on a zero input to catch size problems.
    """
    from deltafm.models import build_model

    kw = dict(cfg.model.kwargs)
    for k in ("channel_mult", "attn_levels"):
        if isinstance(kw.get(k), list):
            kw[k] = tuple(kw[k])
    desc = (f"model {cfg.model.name!r} for {info.name} ({info.channels}x{info.image_size}x{info.image_size}, "
            f"{info.num_classes} classes)")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.train.seed if seed is None else seed, 0, "model-init"))
            model = build_model(cfg.model.name, in_channels=info.channels, image_size=info.image_size,
                                num_classes=info.num_classes, **kw)
        if check:
            x = torch.zeros(1, info.channels, info.image_size, info.image_size)
            with torch.no_grad():
                out = model(x, torch.zeros(1), torch.zeros(1, dtype=torch.long))
            if out.shape != x.shape:
                raise ValueError(f"it returns shape {tuple(out.shape)} for input {tuple(x.shape)}")
    except (ValueError, TypeError) as e:
        raise SetupError(f"cannot use {desc}: {e}") from None
    return model


def build_objective(cfg: Config, num_classes: int) -> DeltaFMObjective:
    """The :class:`DeltaFMObjective` of ``cfg.objective`` (λ schedule included)."""
    o = cfg.objective
    lam: float | LambdaSchedule = o.lam
    if o.lam_schedule is not None:
        kw = dict(o.lam_schedule)
        kw.setdefault("end", o.lam)
        try:
            lam = LambdaSchedule(**kw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config key 'objective.lam_schedule': {e}") from None
    try:
        return DeltaFMObjective(
            path=o.path, time_sampler=o.time_sampler, lam=lam, negatives=o.negatives,
            gather_negatives=o.gather_negatives, num_classes=num_classes, label_dropout=o.label_dropout,
            contrast_unconditional=o.contrast_unconditional, negative_time=o.negative_time,
            hard_other_class=o.hard_other_class, time_sampler_kwargs=dict(o.time_kwargs) or None,
        )  # fmt: skip
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config section 'objective': {e}") from None


# ----------------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------------


def _rng_state(gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    st: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "objective": gen.get_state(),
    }
    if device.type == "cuda":
        st["torch_cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict[str, Any], gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(st["torch_cpu"])
    np.random.set_state(st["numpy"])
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    gen.set_state(st["objective"])
    if device.type == "cuda" and "torch_cuda" in st:
        torch.cuda.set_rng_state(st["torch_cuda"], device)


def _reseed_all(seed: int, rank: int, images: int, gen: torch.Generator) -> None:
    """Fresh, reproducible streams for a rank that has no saved state (first start or new world size)."""
    s = derive_seed(seed, rank, f"global@{images}")
    torch.manual_seed(s)
    np.random.seed(s % (2**32))
    random.seed(s)
    gen.manual_seed(derive_seed(seed, rank, f"objective@{images}"))


# ----------------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------------


class _StopFlag:
    """SIGTERM/SIGINT set a flag (checked after each step); a second signal restores the default action."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _mean_target_state(obj: DeltaFMObjective, di: DistInfo) -> dict[str, torch.Tensor]:
    """The objective's running sums added over ranks (each rank tracks its own batches)."""
    st = obj.state_dict()
    if di.distributed:
        for k in ("sum_x1", "sum_x0", "count", "sum_rates"):
            if k in st:
                t = st[k].to(di.device)
                all_reduce_sum(t)
                st[k] = t.cpu()
    return st


def _resolve_resume(out_dir: Path, resume: str | None, di: DistInfo) -> Path | None:
    ckpt_root = out_dir / "checkpoints"
    if not di.is_main:
        return None
    warn = lambda m: console(f"warning: {m}")  # noqa: E731
    if resume is None:
        existing = [p for p in list_checkpoints(ckpt_root) if (p / "COMPLETE").is_file()]
        if existing:
            raise SetupError(
                f"{out_dir} already holds checkpoints (newest {existing[-1].name}); pass --resume auto to "
                "continue that run, or choose another --out (nothing was changed)"
            )
        return None
    if resume == "auto":
        found = find_latest_checkpoint(ckpt_root, warn)
        if found is None:
            console(f"no checkpoint in {ckpt_root}: starting from scratch")
        return found
    try:
        return resolve_checkpoint(resume, warn)
    except CheckpointError:
        raise
    except OSError as e:  # pragma: no cover
        raise CheckpointError(f"cannot read checkpoint {resume}: {e}") from None


def train(cfg: Config, out_dir: str | Path, resume: str | None = None) -> TrainResult:
    """Run (or continue) training; see the module docstring. ``resume``: None, "auto" or a path."""
    cfg.validate()
    out_dir = Path(out_dir)
    threads_before = torch.get_num_threads()
    try:
        di = init_distributed(cfg.train.device)
    except RuntimeError as e:
        raise SetupError(f"cannot start on train.device={cfg.train.device!r}: {e}") from None
    try:
        return _train(cfg, out_dir, resume, di)
    finally:
        shutdown_distributed()
        torch.set_num_threads(threads_before)


def _train(cfg: Config, out_dir: Path, resume: str | None, di: DistInfo) -> TrainResult:
    t_cfg = cfg.train
    threads = set_threads(di.world_size, t_cfg.threads) if di.device.type == "cpu" else torch.get_num_threads()
    say = lambda m: console(m, enabled=di.is_main)  # noqa: E731

    # ---- everything that can fail on bad input, before anything is written -------------------------
    micro_div = di.world_size * t_cfg.grad_accum
    if t_cfg.batch_size % micro_div:
        raise ConfigError(
            f"config key 'train.batch_size' ({t_cfg.batch_size}) must be divisible by world_size x "
            f"train.grad_accum = {di.world_size} x {t_cfg.grad_accum}"
        )
    ds = load_training_data(cfg)
    if len(ds) < t_cfg.batch_size:
        raise ConfigError(f"config key 'train.batch_size' ({t_cfg.batch_size}) exceeds the dataset size ({len(ds)})")
    try:
        image_size = ds.image_size
    except ValueError as e:
        raise SetupError(str(e)) from None
    info = DataInfo(ds.name, ds.kind, ds.channels, image_size, ds.num_classes, len(ds),
                    list(ds.class_names) if ds.class_names else None, float(ds.latent_scale),
                    float(ds.latent_shift))
    raw = build_model_for(cfg, info)
    objective = build_objective(cfg, info.num_classes)
    # rank 0 picks (and verifies) the checkpoint; its verdict, or its error, is shared with every rank
    found, err = None, None
    if di.is_main:
        try:
            p = _resolve_resume(out_dir, resume, di)
            found = str(p) if p is not None else None
        except (SetupError, CheckpointError) as e:
            err = (type(e).__name__, str(e))
    found, err = broadcast_object((found, err))
    if err is not None:
        kinds = {"SetupError": SetupError, "PickleCheckpointError": PickleCheckpointError}
        raise kinds.get(err[0], CheckpointError)(err[1])
    ckpt: Checkpoint | None = load_checkpoint(found, verify=False) if found else None  # verified above
    if ckpt is not None:
        try:
            raw.load_state_dict(ckpt.model)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {ckpt.path} does not fit model {cfg.model.name!r}: {e}") from None
        if di.is_main and ckpt.config is not None:
            changed = diff_configs(config_from_dict(ckpt.config), cfg)
            if changed:
                say("note: config differs from the checkpoint's: "
                    + ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed))

    # ---- set up -------------------------------------------------------------------------------------
    device = di.device
    raw.to(device)
    ema = None
    if t_cfg.ema_decay is not None or t_cfg.ema_halflife_images is not None:
        ema = EMA(raw, t_cfg.ema_decay, t_cfg.ema_halflife_images, t_cfg.ema_rampup)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(raw.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay, fused=fused or None)
    amp_dtype = _PRECISION[t_cfg.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=t_cfg.precision == "fp16")
    from deltafm.data import EpochBatchSampler, batches

    sampler = EpochBatchSampler(len(ds), t_cfg.batch_size, t_cfg.seed, di.rank, di.world_size)
    gen = torch.Generator(device=device)
    step, images = 0, 0
    if ckpt is not None:
        st = ckpt.state
        step, images = int(st["step"]), int(st["images_seen"])
        if ema is not None:
            if ckpt.ema is None:
                say("note: checkpoint has no EMA weights; the EMA starts from the model weights")
                ema = EMA(raw, t_cfg.ema_decay, t_cfg.ema_halflife_images, t_cfg.ema_rampup)
            else:
                ema.load_state_dict(ckpt.ema)
        try:
            opt.load_state_dict(st["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"cannot restore the optimizer state of {ckpt.path}: {e}") from None
        if st.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(st["scaler"])
        try:
            sampler.load_state_dict(st["sampler"])
        except ValueError as e:
            raise CheckpointError(f"cannot continue the data order of {ckpt.path}: {e}") from None
        mt = st.get("mean_target")
        if mt:
            objective.load_state_dict(mt)
            objective.mean_target.to(device)
            if not di.is_main:  # rank 0 carries the saved sums, the others add their own batches to zero
                for name in ("sum_x1", "sum_x0", "count", "sum_rates"):
                    v = getattr(objective.mean_target, name)
                    if v is not None:
                        v.zero_()
        rng = st.get("rng", [])
        if int(st.get("world_size", 1)) == di.world_size and len(rng) == di.world_size:
            _set_rng_state(rng[di.rank], gen, device)
        else:
            _reseed_all(t_cfg.seed, di.rank, images, gen)
            say(f"note: world size changed ({st.get('world_size')} -> {di.world_size}): images seen kept "
                f"({images}), per-rank random streams re-derived")
    else:
        _reseed_all(t_cfg.seed, di.rank, 0, gen)

    model: nn.Module = raw
    if t_cfg.compile:
        model = torch.compile(model)
    if di.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    if di.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(format_config(cfg))
        if resume is not None and (ckpt is None or ckpt.path.parent.resolve() == (out_dir / "checkpoints").resolve()):
            # step folders newer than the one resumed from (or all, for a fresh start) were skipped as invalid
            set_aside_newer(out_dir / "checkpoints", step if ckpt is not None else -1,
                            lambda m: say(f"warning: {m}"))
    barrier()
    logger = RunLogger(out_dir, jsonl=cfg.log.jsonl, tensorboard=cfg.log.tensorboard, enabled=di.is_main)

    flops = raw.flops_per_sample() if hasattr(raw, "flops_per_sample") else None
    peak = cfg.log.peak_flops or measure_matmul_peak(device, amp_dtype or torch.float32)
    total_steps = _total_steps(cfg, step, images)
    nparams = sum(p.numel() for p in raw.parameters())
    say(f"deltafm train: {cfg.model.name} ({nparams / 1e6:.2f}M params) on {info.name} "
        f"({info.num_items} items, {info.channels}x{info.image_size}x{info.image_size}); "
        f"{di.world_size} rank(s) on {device.type}, {threads} thread(s) each; batch {t_cfg.batch_size}; "
        f"lam {cfg.objective.lam}; {'resuming from ' + str(ckpt.path) if ckpt else 'from scratch'}; "
        f"until step {total_steps}; out {out_dir}")
    if ckpt is None:
        logger.event(step, images, "start", params=nparams, world_size=di.world_size, threads=threads)
    else:
        logger.event(step, images, "resume", checkpoint=str(ckpt.path), world_size=di.world_size)

    data = batches(ds, sampler, device=device)
    params = [p for p in raw.parameters() if p.requires_grad]
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip and cfg.optim.grad_clip > 0 else math.inf
    micro = t_cfg.batch_size // micro_div
    bar = None
    if di.is_main and cfg.log.progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, desc="train")

    last_ckpt: Path | None = ckpt.path if ckpt else None
    last_saved_step = step if ckpt else -1
    window = {"time": 0.0, "images": 0, "steps": 0, "sums": torch.zeros(3, dtype=torch.float64)}
    metrics: dict[str, float] = {}
    status = "done"
    grid_path: Path | None = None

    def save(reason: str) -> Path | None:
        nonlocal last_ckpt, last_saved_step
        rngs = all_gather_object(_rng_state(gen, device))
        mt = _mean_target_state(objective, di)
        if di.is_main:
            state = {
                "step": step,
                "images_seen": images,
                "world_size": di.world_size,
                "config": config_to_dict(cfg),
                "data": info.to_dict(),
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "sampler": sampler.state_dict(),
                "rng": rngs,
                "mean_target": mt,
                "lam": objective.lam_at(images),
                "reason": reason,
            }
            last_ckpt = save_checkpoint(out_dir / "checkpoints", step, raw.state_dict(), state,
                                        ema=ema.state_dict() if ema is not None else None,
                                        keep_last=t_cfg.keep_last)
            logger.event(step, images, "checkpoint", path=str(last_ckpt), reason=reason)
        last_saved_step = step
        barrier()
        return last_ckpt

    with _StopFlag() as stop:
        try:
            while not _finished(cfg, step, images):
                t0 = time.perf_counter()
                lr = cfg.optim.lr * (min(1.0, (images + t_cfg.batch_size) / cfg.optim.warmup_images)
                                     if cfg.optim.warmup_images > 0 else 1.0)
                for g in opt.param_groups:
                    g["lr"] = lr
                x, y = next(data)
                sums = torch.zeros(3, dtype=torch.float64, device=device)
                for i in range(t_cfg.grad_accum):
                    xm, ym = x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro]
                    last = i == t_cfg.grad_accum - 1
                    sync = model.no_sync() if (di.distributed and not last) else contextlib.nullcontext()
                    with sync:
                        with _autocast(device, amp_dtype):
                            out = objective(model, xm, ym, generator=gen, progress=images)
                        scaler.scale(out.loss / t_cfg.grad_accum).backward()
                    parts = torch.stack([out.parts[k].to(device) for k in ("loss", "positive", "negative")])
                    sums += parts.double() / t_cfg.grad_accum
                scaler.unscale_(opt)
                gnorm = torch.nn.utils.clip_grad_norm_(params, clip).double()
                bad = ~torch.isfinite(sums[0])
                if t_cfg.precision != "fp16":  # under fp16 the GradScaler skips steps with inf gradients
                    bad = bad | ~torch.isfinite(gnorm)
                stop_flag = torch.tensor(float(stop.signum is not None), dtype=torch.float64, device=device)
                # one host sync per step: losses, the non-finite flag and the stop flag, summed over ranks
                flags = torch.cat([sums, bad.double()[None], stop_flag[None]])
                all_reduce_sum(flags)
                flags, gnorm_f = flags.cpu(), float(gnorm)
                if flags[3] > 0:
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient at step {step + 1} (images {images}): "
                        f"loss={float(sums[0])}, grad_norm={gnorm_f} on rank {di.rank}; the optimizer step was "
                        f"not taken. Last good checkpoint: {last_ckpt or 'none yet'}. Try a lower optim.lr, "
                        "train.precision=fp32, or optim.grad_clip."
                    )
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                step += 1
                images += t_cfg.batch_size
                if ema is not None:
                    ema.update(raw, t_cfg.batch_size, images)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                window["time"] += time.perf_counter() - t0
                window["images"] += t_cfg.batch_size
                window["steps"] += 1
                window["sums"] += flags[:3] / di.world_size
                if bar is not None:
                    bar.update(1)
                stop_now = flags[4] > 0

                if step % cfg.log.every == 0 or stop_now or _finished(cfg, step, images):
                    n = max(window["steps"], 1)
                    ips = window["images"] / max(window["time"], 1e-9)
                    loss, pos, neg = (window["sums"] / n).tolist()
                    metrics = {"loss": loss, "positive": pos, "negative": neg, "lam": objective.lam_at(images),
                               "lr": lr, "grad_norm": gnorm_f, "images_per_s": ips,
                               "s_per_step": window["time"] / n}
                    m = mfu(flops, ips, peak * di.world_size)
                    if m is not None:
                        metrics["mfu"] = m
                    if ema is not None and ema.last_beta is not None:
                        metrics["ema_beta"] = ema.last_beta
                    logger.log(step, images, metrics)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.4f}", pos=f"{pos:.4f}", neg=f"{neg:.4f}",
                                        lam=f"{metrics['lam']:.3g}", ips=f"{ips:.0f}", refresh=False)
                    window = {"time": 0.0, "images": 0, "steps": 0, "sums": torch.zeros(3, dtype=torch.float64)}

                if cfg.sample.every > 0 and step % cfg.sample.every == 0 and not _finished(cfg, step, images):
                    grid_path = _sample_grid(cfg, raw, ema, objective, info, out_dir, step, device, di)
                if stop_now:
                    status = "interrupted"
                    save("signal")
                    if bar is not None:
                        bar.close()
                    say(f"\ninterrupted by signal at step {step}: checkpoint {last_ckpt}; "
                        f"continue with --resume auto")
                    logger.event(step, images, "interrupted")
                    break
                if step % t_cfg.ckpt_every == 0:
                    save("periodic")
            else:
                if last_saved_step != step:
                    save("final")
                if bar is not None:
                    bar.close()
                if cfg.sample.every >= 0:
                    grid_path = _sample_grid(cfg, raw, ema, objective, info, out_dir, step, device, di)
                logger.event(step, images, "done")
        finally:
            if bar is not None:
                bar.close()
            logger.close()
    if status == "done":
        say(f"done: step {step}, {images} images; checkpoint {last_ckpt}"
            + (f"; samples {grid_path}" if grid_path else ""))
    return TrainResult(out_dir, status, step, images, last_ckpt, grid_path, metrics)


def _finished(cfg: Config, step: int, images: int) -> bool:
    if cfg.train.steps is not None:
        return step >= cfg.train.steps
    assert cfg.train.total_images is not None
    return images >= cfg.train.total_images


def _total_steps(cfg: Config, step: int, images: int) -> int:
    if cfg.train.steps is not None:
        return cfg.train.steps
    assert cfg.train.total_images is not None
    return step + max(0, math.ceil((cfg.train.total_images - images) / cfg.train.batch_size))


def _sample_grid(cfg: Config, raw: nn.Module, ema: EMA | None, objective: DeltaFMObjective, info: DataInfo,
                 out_dir: Path, step: int, device: torch.device, di: DistInfo) -> Path | None:
    """Rank 0 writes ``samples/step_XXXXXXXX.png`` from the EMA model (images only, not latents)."""
    if not di.is_main or info.kind != "images":
        return None
    from deltafm.sampling import generate, labels_for, save_grid, to_uint8_nhwc

    net = ema.module if ema is not None else raw
    was_training = net.training
    net.eval()
    s = cfg.sample
    correction = None
    if s.bias_correction and objective.lam_at(10**18) > 0 and objective.mean_target.initialized:
        correction = objective.bias_correction()
    labels = labels_for(s.num, info.num_classes)
    x = generate(net, labels=labels, shape=(info.channels, info.image_size, info.image_size),
                 num_classes=info.num_classes, solver=s.solver, steps=s.steps, cfg=s.cfg, interval=s.interval,
                 correction=correction, seed=s.seed, batch_size=s.batch_size, device=device,
                 path=objective.path)
    net.train(was_training)
    path = out_dir / "samples" / f"step_{step:08d}.png"
    save_grid(to_uint8_nhwc(x), path, ncol=min(info.num_classes, s.num))
    return path
