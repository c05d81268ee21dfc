"""Starting a run: check and build everything that can fail on bad input, then resume from a checkpoint.

:func:`setup_run` writes nothing (at most the run folder's lock file, removed again on failure). In this
order it

1. checks that the global batch splits over ranks and micro-steps into pools of >= 2 samples when ΔFM
   draws negatives, loads the data, builds the model and the objective (bad input:
   :class:`~deltafm.train.builders.SetupError` or :class:`~deltafm.train.config.ConfigError`);
2. lets rank 0 lock the run folder and pick and verify the checkpoint to resume from
   (:meth:`~deltafm.train.runfolder.RunFolder.checkpoint_to_resume`); its verdict, or its error, is
   shared with every rank, so all ranks start or all stop; loads the checkpoint's weights;
3. builds AdamW (fused on CUDA and CPU), the GradScaler, the EMA, the batch sampler and the objective's
   ``torch.Generator``, and restores the checkpoint's :class:`~deltafm.train.state.RunState` into
   them (:meth:`Run.resume`) or seeds fresh per-rank streams;
4. with ``train.precision: bf16-compute`` makes the model's bf16 compute copy
   (:class:`~deltafm.train.bf16_compute.Bf16Compute`), and wraps what the step calls for ``torch.compile``
   and DDP.

:meth:`Run.snapshot` is the inverse of :meth:`Run.resume`: the RunState a checkpoint saves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltafm.data import EpochBatchSampler
from deltafm.objective import DeltaFMObjective

from .allocator import keep_freed_memory
from .bf16_compute import Bf16Compute
from .builders import DataInfo, SetupError, build_model_for, build_objective, data_info, load_training_data
from .checkpoint import Checkpoint, CheckpointError, PickleCheckpointError, load_checkpoint
from .conditions import Conditions
from .config import Config, ConfigError, config_from_dict, config_to_dict, diff_configs
from .distributed import DistInfo, all_gather_object, all_reduce_sum, broadcast_object, set_threads
from .ema import EMA
from .fused_update import FusedUpdate
from .logging import check_backends, console
from .optim import build_adamw, restore_adamw
from .repa import RepaTargets
from .runfolder import RunFolder
from .state import RunState, capture_rng, reseed_rng, restore_rng

__all__ = ["Run", "setup_run"]

#: the autocast dtype of each train.precision; bf16-compute runs a bf16 copy without autocast (.bf16_compute)
_PRECISION = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "bf16-compute": None}
_SUMS = ("sum_x1", "sum_x0", "count", "sum_rates")  # the mean target's running sums (per rank)


@dataclass
class Run:
    """A run in progress: its config, the objects a step touches, and how far it got."""

    cfg: Config
    di: DistInfo
    folder: RunFolder  # every write below the run folder goes through it
    dataset: Any
    info: DataInfo
    raw: nn.Module  # the model as built; checkpoints save its weights
    objective: DeltaFMObjective
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: EMA | None
    sampler: EpochBatchSampler
    gen: torch.Generator  # everything the objective draws on this rank
    threads: int
    targets: RepaTargets | None = None  # REPA's encoder tokens (repa.*), None when off
    conditions: Conditions | None = None  # multi/text conditioning (conditioning.*), None for class ids
    model: nn.Module = field(init=False)  # what a step calls: raw (or its bf16 copy), compiled and/or DDP-wrapped
    compute: Bf16Compute | None = None  # the bf16 compute copy under train.precision=bf16-compute
    fused: FusedUpdate | None = None  # the one-pass update under optim.fused_update
    params: list[nn.Parameter] = field(init=False)  # the trained parameters (gradient clipping)
    step: int = 0
    images: int = 0
    resumed_from: Path | None = None
    last_checkpoint: Path | None = None
    last_saved_step: int = -1

    def __post_init__(self) -> None:
        self.model = self.raw
        self.params = [p for p in self.raw.parameters() if p.requires_grad]

    @property
    def out_dir(self) -> Path:
        return self.folder.root

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return _PRECISION[self.cfg.train.precision]

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the model's matmuls run in (for the MFU's peak rate)."""
        return torch.bfloat16 if self.cfg.train.precision == "bf16-compute" else (self.amp_dtype or torch.float32)

    @property
    def clip(self) -> float:
        c = self.cfg.optim.grad_clip
        return c if c and c > 0 else math.inf

    @property
    def micro_batch(self) -> int:
        """Images per rank and micro-step."""
        t = self.cfg.train
        return t.batch_size // (self.di.world_size * t.grad_accum)

    @property
    def finished(self) -> bool:
        t = self.cfg.train
        if t.steps is not None:
            return self.step >= t.steps
        assert t.total_images is not None
        return self.images >= t.total_images

    @property
    def total_steps(self) -> int:
        t = self.cfg.train
        if t.steps is not None:
            return t.steps
        assert t.total_images is not None
        return self.step + max(0, math.ceil((t.total_images - self.images) / t.batch_size))

    def say(self, msg: str) -> None:
        console(msg, enabled=self.di.is_main)

    def snapshot(self, reason: str) -> RunState | None:
        """The :class:`RunState` to save now (on rank 0; None elsewhere). Collective: every rank calls
        it (the RNG states are gathered, the mean target's sums added over ranks)."""
        rngs = all_gather_object(capture_rng(self.gen, self.di.device))
        mean_target = _mean_target_state(self.objective, self.di)
        if not self.di.is_main:
            return None
        return RunState(
            step=self.step, images_seen=self.images, world_size=self.di.world_size,
            config=config_to_dict(self.cfg), data=self.info.to_dict(), optimizer=self.opt.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
            sampler=self.sampler.state_dict(), rng=rngs, mean_target=mean_target,
            lam=self.objective.lam_at(self.images), reason=reason,
        )  # fmt: skip

    def resume(self, ckpt: Checkpoint) -> None:
        """Continue from ``ckpt`` (weights already loaded): progress, EMA, optimizer, scaler, data order,
        mean target and random streams (re-derived when the world size changed)."""
        st = RunState.from_checkpoint(ckpt.state)
        self.step, self.images = st.step, st.images_seen
        self.resumed_from = self.last_checkpoint = ckpt.path
        self.last_saved_step = st.step
        if self.ema is not None:
            if ckpt.ema is None:
                self.say("note: checkpoint has no EMA weights; the EMA starts from the model weights")
            else:
                self.ema.load_state_dict(ckpt.ema)
        try:
            restore_adamw(self.opt, st.optimizer)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot restore the optimizer state of {ckpt.path}: {e}") from None
        if st.scaler and self.scaler.is_enabled():
            self.scaler.load_state_dict(st.scaler)
        try:
            self.sampler.load_state_dict(st.sampler)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot continue the data order of {ckpt.path}: {e}") from None
        if st.mean_target:
            self._resume_mean_target(st.mean_target)
        rng = st.rng_of(self.di.rank, self.di.world_size)
        if rng is not None:
            restore_rng(rng, self.gen, self.di.device)
        else:
            reseed_rng(self.cfg.train.seed, self.di.rank, self.images, self.gen)
            self.say(f"note: world size changed ({st.world_size} -> {self.di.world_size}): images seen kept "
                     f"({self.images}), per-rank random streams re-derived")

    def _resume_mean_target(self, state: dict[str, torch.Tensor]) -> None:
        self.objective.load_state_dict(state)
        self.objective.mean_target.to(self.di.device)
        if not self.di.is_main:  # rank 0 carries the saved sums, the others add their own batches to zero
            for name in _SUMS:
                v = getattr(self.objective.mean_target, name)
                if v is not None:
                    v.zero_()


def setup_run(cfg: Config, folder: RunFolder, resume: str | None, di: DistInfo) -> Run:
    """Validate, build and (with ``resume``) restore a run; see the module docstring. Writes nothing;
    on rank 0 ``folder`` holds the lock afterwards (when the folder exists)."""
    t = cfg.train
    threads = set_threads(di.world_size, t.threads) if di.device.type == "cpu" else torch.get_num_threads()
    if t.keep_freed_memory and di.device.type == "cpu" and not keep_freed_memory():
        console("note: train.keep_freed_memory needs glibc's malloc; the allocator is left as it is",
                enabled=di.is_main)
    ds, info, raw, objective, targets, conditions = _build(cfg, di)
    ckpt = _checkpoint_to_resume(folder, resume, di)
    if ckpt is not None:
        _load_weights(raw, ckpt, cfg, di)
    device = di.device
    raw.to(device)
    ema = EMA(raw, t.ema_decay, t.ema_halflife_images, t.ema_rampup) if (
        t.ema_decay is not None or t.ema_halflife_images is not None) else None
    o = cfg.optim
    opt = build_adamw(raw.parameters(), o, device)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    sampler = EpochBatchSampler(len(ds), t.batch_size, t.seed, di.rank, di.world_size)
    run = Run(cfg, di, folder, ds, info, raw, objective, opt, scaler, ema, sampler,
              torch.Generator(device=device), threads, targets, conditions)
    if ckpt is not None:
        run.resume(ckpt)
    else:
        reseed_rng(t.seed, di.rank, 0, run.gen)
    if t.precision == "bf16-compute":  # after the weights are loaded: the copy starts as bf16(master)
        run.compute = Bf16Compute(raw)
    if o.fused_update:  # after the copy: its kernels write the copy too
        run.fused = FusedUpdate(opt, raw, ema, run.compute)
    run.model = _wrap(run.compute or raw, cfg, di)
    return run


def _build(cfg: Config, di: DistInfo) -> tuple[Any, DataInfo, nn.Module, DeltaFMObjective, RepaTargets | None,
                                               Conditions | None]:
    """The data, the model, the objective, the REPA targets and the multi/text conditioning; bad input raises
    before anything is written."""
    t = cfg.train
    if t.batch_size % (di.world_size * t.grad_accum):
        raise ConfigError(
            f"config key 'train.batch_size' ({t.batch_size}) must be divisible by world_size x "
            f"train.grad_accum = {di.world_size} x {t.grad_accum}"
        )
    _check_negative_pool(cfg, di)
    check_backends(cfg.log)  # log.wandb needs the package wandb
    ds = load_training_data(cfg)  # ImageDataset checks every label once, here (steps skip the checks)
    if len(ds) < t.batch_size:
        raise ConfigError(f"config key 'train.batch_size' ({t.batch_size}) exceeds the dataset size ({len(ds)})")
    info = data_info(ds)
    _check_grid_vae(cfg, info)
    targets = RepaTargets.from_config(cfg.repa, ds, info.kind == "latents", di.device)
    if targets is not None:
        info.align_dims = targets.dims
    conditions = Conditions.from_config(cfg.conditioning, ds, di.device, progress=di.is_main)
    if conditions is not None:
        info.conditioning = conditions.describe()
    return (ds, info, build_model_for(cfg, info), build_objective(cfg, info.num_classes, info.conditioning), targets,
            conditions)


def _check_grid_vae(cfg: Config, info: DataInfo) -> None:
    """``sample.vae`` (the VAE for latent grids) must load and match the latents' VAE, before any step."""
    if cfg.sample.vae is None:
        return
    if info.kind != "latents":
        raise ConfigError(f"config key 'sample.vae' ({cfg.sample.vae}) is for latent data; {info.name} is pixels")
    from deltafm.vae import AutoencoderError
    from deltafm.vae.decoding import find_decoder

    try:
        find_decoder(info.vae_source, info.vae_identity, cfg.sample.vae)
    except AutoencoderError as e:
        raise ConfigError(f"config key 'sample.vae': {e}") from None


def _check_negative_pool(cfg: Config, di: DistInfo) -> None:
    """ΔFM draws each anchor's negative among the *other* samples of its pool: a pool needs >= 2."""
    t, o = cfg.train, cfg.objective
    per_rank = t.batch_size // (di.world_size * t.grad_accum)
    pool = per_rank * (di.world_size if o.gather_negatives else 1)
    if o.negatives != "none" and pool < 2:
        raise ConfigError(
            f"config keys 'train.batch_size' ({t.batch_size}) and 'train.grad_accum' ({t.grad_accum}) leave "
            f"{per_rank} sample per process and micro-step on {di.world_size} processes, but ΔFM negatives "
            f"(objective.negatives={o.negatives!r}) need >= 2 samples to draw a negative other than the anchor: "
            f"raise train.batch_size to >= {2 * di.world_size * t.grad_accum}, lower train.grad_accum, set "
            "objective.gather_negatives=true, or use objective.negatives=none (plain flow matching)"
        )


def _wrap(raw: nn.Module, cfg: Config, di: DistInfo) -> nn.Module:
    """What the step calls: ``raw`` (or its bf16 copy), compiled under ``train.compile``, then DDP."""
    t = cfg.train
    model = raw
    if t.compile:  # static shapes: every batch of a run has the same shape (the sampler drops the last)
        model = torch.compile(raw, dynamic=False, mode=t.compile_mode)
    if di.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[di.device.index] if di.device.type == "cuda" else None)
    return model


def _load_weights(raw: nn.Module, ckpt: Checkpoint, cfg: Config, di: DistInfo) -> None:
    try:
        raw.load_state_dict(ckpt.model)
    except RuntimeError:
        saved = (ckpt.config or {}).get("model", {})
        raise CheckpointError(
            f"checkpoint {ckpt.path} does not fit model {_desc(cfg.model.name, cfg.model.kwargs)}: "
            f"{_mismatch(raw.state_dict(), ckpt.model)}; it was saved from model "
            f"{_desc(saved.get('name'), saved.get('kwargs'))}: give the same model.* settings, or start a new "
            "run with another --out"
        ) from None
    if di.is_main and ckpt.config is not None:
        changed = diff_configs(config_from_dict(ckpt.config), cfg)
        if changed:
            console("note: config differs from the checkpoint's: "
                    + ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed))


def _desc(name: Any, kwargs: Any) -> str:
    return f"{name!r}" + (f" with kwargs {dict(kwargs)}" if kwargs else "")


def _mismatch(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str:
    """One line on how two state dicts differ (counts and the first example of each kind)."""
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    shapes = [f"{k} {list(got[k].shape)} vs {list(want[k].shape)}" for k in want
              if k in got and got[k].shape != want[k].shape]
    parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in (
        ("weights missing", missing), ("unexpected weights", extra), ("shape mismatches, saved vs model", shapes)) if v]
    return ", ".join(parts) or "the weights differ"


def _checkpoint_to_resume(folder: RunFolder, resume: str | None, di: DistInfo) -> Checkpoint | None:
    """Rank 0 locks the folder and picks (and verifies) the checkpoint; its verdict, or its error, is
    shared with every rank."""
    found, err = None, None
    if di.is_main:
        try:
            folder.lock()
            p = folder.checkpoint_to_resume(resume, console)
            found = str(p) if p is not None else None
        except (SetupError, CheckpointError) as e:
            err = (type(e).__name__, str(e))
    found, err = broadcast_object((found, err))
    if err is not None:
        kinds = {"SetupError": SetupError, "PickleCheckpointError": PickleCheckpointError}
        raise kinds.get(err[0], CheckpointError)(err[1])
    return load_checkpoint(found, verify=False) if found else None  # verified above


def _mean_target_state(obj: DeltaFMObjective, di: DistInfo) -> dict[str, torch.Tensor]:
    """The objective's running sums added over ranks (each rank tracks its own batches)."""
    st = obj.state_dict()
    if di.distributed:
        for k in _SUMS:
            if k in st:
                t = st[k].to(di.device)
                all_reduce_sum(t)
                st[k] = t.cpu()
    return st
