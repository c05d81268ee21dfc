"""Typed training configuration: YAML file + ``key.sub=value`` overrides -> :class:`Config`.

A config has nine sections, each a dataclass (``model``, ``data``, ``objective``, ``optim``, ``train``,
``sample``, ``log``, ``repa``, ``conditioning``). :func:`load_config` reads a YAML file, applies command-line
overrides such as ``optim.lr=2e-4`` or ``model.kwargs.base_channels=64`` (each value parsed with
``yaml.safe_load``), and checks every key and value against the dataclass types. Unknown keys (typos)
and values of the wrong type are :class:`ConfigError` naming the dotted key, with the closest valid key
suggested (the conversion is :mod:`deltafm.typed_config`, shared with the study spec).

Presets (``deltafm train --preset NAME``) are YAML files shipped inside the package, in
``deltafm/presets/`` (``configs/`` in a source checkout is a link to that folder).

Units: durations and the EMA half-life are counted in **images seen** (global, over all ranks), so
changing the batch size or the number of ranks keeps their meaning; logging, sampling and checkpoint
intervals are counted in optimizer steps. ``train.batch_size`` is the *global* batch (all ranks, all
accumulation micro-steps together): per rank and micro-step it is ``batch_size / (world_size *
grad_accum)``, and with ΔFM negatives (``objective.negatives`` other than ``none``) it must be >= 2, since a
negative is another sample of the same pool.
"""

from __future__ import annotations

import difflib
import importlib.resources
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from deltafm.solvers import SOLVERS, get_solver
from deltafm.typed_config import ConfigError, build, dotted_keys, field_names, read_yaml, to_dict, unknown_key_error

from .conditioning_config import ConditioningConfig, validate_conditioning

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "TrainConfig",
    "SampleConfig",
    "LogConfig",
    "RepaConfig",
    "ConditioningConfig",
    "Config",
    "load_config",
    "parse_overrides",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "format_config",
    "find_preset",
    "preset_dir",
    "diff_configs",
]


@dataclass
class ModelConfig:
    """Backbone: ``deltafm.models.build_model(name, in_channels=..., image_size=..., num_classes=..., **kwargs)``.

    ``in_channels``, ``image_size`` and ``num_classes`` come from the dataset; ``kwargs`` are the
    preset's overrides (e.g. ``{base_channels: 32}`` for a UNet, ``{depth: 4}`` for a SiT).
    """

    name: str = "unet-s"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Dataset: ``deltafm.data.load_dataset(name, root=root, split=split)``.

    Images are uint8 and normalised to ``p / 127.5 - 1`` in [-1, 1]; latent shards are used as the loader
    returns them (already in model space, the VAE scale such as 0.18215 applied from the shard metadata;
    read lazily from disk, with z = μ + σ·ε drawn per step when the shards hold a std).
    ``image_size`` and ``channels`` apply to the ``folder`` and ``webdataset`` (tar shards, streamed)
    datasets only; ``max_items`` keeps the first items (quick runs). ``workers`` loader processes (0: load
    in the training process) each keep ``prefetch`` batches loaded ahead (:class:`deltafm.data.BatchLoader`;
    batches and resume do not depend on either).
    """

    name: str = "fashion-mnist"
    root: str | None = None
    split: str = "train"
    image_size: int | None = None
    channels: int | None = None
    max_items: int | None = None
    workers: int = 0
    prefetch: int = 2


@dataclass
class ObjectiveConfig:
    """Arguments of :class:`deltafm.objective.DeltaFMObjective` (``lam = 0`` is plain flow matching).

    ``lam`` must satisfy 0 <= lam < 1 (the loss is unbounded below for lam >= 1). ``lam_schedule``, when
    set, is a mapping of :class:`deltafm.schedules.LambdaSchedule` arguments (``kind``: constant, linear
    or cosine; ``start``; ``end`` (default: ``lam``); ``duration`` in images seen) and replaces the
    constant ``lam``.
    """

    path: str = "linear"
    time_sampler: str = "uniform"
    time_kwargs: dict[str, Any] = field(default_factory=dict)
    lam: float = 0.05
    lam_schedule: dict[str, Any] | None = None
    negatives: str = "uniform"
    gather_negatives: bool = False
    label_dropout: float = 0.1
    contrast_unconditional: bool = True
    negative_time: Literal["anchor", "own"] = "anchor"
    hard_other_class: bool = False
    hard_on: Literal["u", "x1"] = "u"


@dataclass
class OptimConfig:
    """AdamW with a linear learning-rate warm-up over ``warmup_images`` and gradient-norm clipping
    (``grad_clip`` <= 0 or null turns clipping off). ``fused``: torch's fused AdamW kernel on CUDA and CPU
    (:func:`deltafm.train.optim.build_adamw`). ``fused_update``: clipping, AdamW, the bf16 copy's refresh and
    the EMA in one compiled kernel per parameter tensor (:mod:`deltafm.train.fused_update`; compiles at the
    first step; not with ``train.precision: fp16``)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    warmup_images: int = 0
    fused: bool = True
    fused_update: bool = False


@dataclass
class TrainConfig:
    """Loop settings. Give exactly one of ``total_images`` and ``steps``.

    EMA: either a per-step ``ema_decay`` (the paper's 0.9999) or ``ema_halflife_images`` (the EMA forgets
    half its weight every that many images, so its per-step decay is ``0.5 ** (batch_size /
    halflife)``); ``ema_rampup`` caps the half-life at ``ema_rampup * images_seen`` early in training.

    ``compile``: ``torch.compile(model, dynamic=False)`` (one graph per input shape, as benchmarked);
    ``compile_mode``: torch.compile's ``mode`` (``default``; ``reduce-overhead`` and ``max-autotune`` add
    CUDA graphs on a GPU; ``max-autotune-no-cudagraphs`` tunes kernels without them).
    """

    seed: int = 0
    batch_size: int = 256
    grad_accum: int = 1
    total_images: int | None = None
    steps: int | None = None
    precision: Literal["fp32", "bf16", "fp16", "bf16-compute"] = "fp32"
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    device: str = "auto"
    threads: int | None = None
    keep_freed_memory: bool = False
    ema_decay: float | None = 0.9999
    ema_halflife_images: float | None = None
    ema_rampup: float | None = None
    ckpt_every: int = 1000
    keep_last: int = 3


@dataclass
class SampleConfig:
    """Sample grids written during training (from the EMA model) and the defaults of ``deltafm sample``.

    ``every`` is in steps (0 = only at the end, -1 = never). ``cfg`` is the guidance scale w (1 = off),
    applied for t in ``interval`` (t = 0 noise, t = 1 data). ``bias_correction`` applies the ΔFM
    correction v_FM = (1 - lam) v + lam * u_bar with the stored mean target: ``off`` (false), ``always``
    (true: at every t) or ``guidance`` (only for t in the guidance ``interval``: the reference
    code's rule); see :func:`deltafm.correction.correction_window`. ``vae``: for latent data, the VAE that
    decodes the grids (a diffusers folder; default: the one the latent shards record, see
    :mod:`deltafm.vae.decoding`); it must be the VAE that encoded the latents.
    """

    every: int = 0
    num: int = 64
    solver: str = "euler"  # a name of deltafm.solvers.SOLVERS
    steps: int = 50
    cfg: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    bias_correction: bool | Literal["off", "always", "guidance"] = False
    seed: int = 0
    batch_size: int = 256
    vae: str | None = None


@dataclass
class LogConfig:
    """Logging: ``every`` steps to the JSONL file, TensorBoard, Weights & Biases and the progress bar.

    MFU is ``flops_per_sample * 3 * images_per_second / peak``; ``peak_flops`` (FLOP/s per rank) is
    measured by a short matmul at start when null.

    ``wandb: true`` also sends the records (and the resolved config, once per start) to Weights & Biases
    from rank 0, into project ``wandb_project`` under the display name ``wandb_name`` (null: the run
    folder's name). ``wandb_mode`` is W&B's mode: ``offline`` (the default: files under ``OUT/wandb``,
    uploaded later with ``wandb sync``, nothing sent over the network), ``online`` or ``disabled``. The
    package ``wandb`` is an optional extra (``pip install 'deltafm[wandb]'``); see
    :class:`deltafm.train.logging.RunLogger`.
    """

    every: int = 10
    jsonl: bool = True
    tensorboard: bool = True
    progress_bar: bool = True
    peak_flops: float | None = None
    wandb: bool = False
    wandb_project: str = "deltafm"
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    wandb_name: str | None = None


@dataclass
class RepaConfig:
    """REPA: align the tokens of block ``encoder_depth`` (1-based) of a SiT, through one projector per
    target (REPA's 3-layer SiLU MLP of width ``projector_dim``), to frozen encoder patch tokens of the clean
    image; the loss gains ``proj_coeff · L_REPA`` (:mod:`deltafm.alignment`). Off unless a target is given.

    Targets: ``encoders`` are encoder folders (:func:`deltafm.encoders.load_encoder`: DINOv2 through
    ``transformers``, or one made by ``deltafm train-encoder``) run on the fly on the clean images (pixel
    data: x itself; latent shards: the images stored beside the latents by ``prepare-latents
    --keep-images``); ``features`` are names of encoder tokens precomputed into the latent shards by
    ``prepare-latents --encoder`` (tensor ``features.<name>``). Both may be given; each gets a projector.
    Defaults are REPA's (encoder_depth 8, proj_coeff 0.5, projector_dim 2048).
    """

    encoders: list[str] = field(default_factory=list)
    features: list[str] = field(default_factory=list)
    encoder_depth: int = 8
    proj_coeff: float = 0.5
    projector_dim: int = 2048

    @property
    def enabled(self) -> bool:
        return bool(self.encoders or self.features)


@dataclass
class Config:
    """The full training configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    log: LogConfig = field(default_factory=LogConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)

    def validate(self) -> Config:
        """Check relations between values; raise :class:`ConfigError` naming the key. Returns self."""
        _validate(self)
        return self


# ----------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------


def config_from_dict(data: dict[str, Any] | None) -> Config:
    """Build and validate a :class:`Config` from a nested mapping (missing keys take defaults)."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    for k in data:
        if k not in field_names(Config):
            raise unknown_key_error(str(k), dotted_keys(Config) + field_names(Config))
    return build(Config, data).validate()


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of the config (tuples become lists), suitable for YAML or JSON."""
    return to_dict(cfg)


class _Dumper(yaml.SafeDumper):
    """Block style for sections, flow style for short lists ([0.9, 0.999])."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def format_config(cfg: Config) -> str:
    """The resolved config as YAML text (what ``--dry-run`` prints); it loads back to the same config."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings; each value is read with ``yaml.safe_load`` (``[0, 1]``, ``null``,
    ``true``, ``3e-4`` all work)."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or " ".join(str(e).split())
            raise ConfigError(f"override '{key}': cannot parse value {raw!r} as YAML ({problem})") from None
        out.append((key, value))
    return out


def apply_overrides(data: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set each dotted key in a nested dict (creating mappings on the way); returns a new dict.

    Keys are checked later by :func:`config_from_dict`, except that a path through a non-mapping value is
    an error here.
    """
    import copy

    out = copy.deepcopy(data)
    for key, value in overrides:
        parts = key.split(".")
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{key}': '{'.'.join(parts[: i + 1])}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def preset_dir() -> Path:
    """The folder of the presets shipped with the package (``deltafm/presets``; ``configs/`` in a checkout)."""
    return Path(str(importlib.resources.files("deltafm") / "presets"))


def find_preset(name: str) -> Path:
    """Path of preset ``NAME`` (``deltafm/presets/NAME.yaml``); a ConfigError listing the presets when it
    does not exist."""
    folder = preset_dir()
    path = folder / (name if name.endswith(".yaml") else f"{name}.yaml")
    if path.is_file():
        return path
    names = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"no preset '{name}' in {folder}{hint} (available: {', '.join(names) or 'none'})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (or start from ``base`` or the defaults), apply overrides, validate."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = read_yaml(path, what="config")
    data = apply_overrides(data, parse_overrides(list(overrides or [])))
    return config_from_dict(data)


def diff_configs(a: Config, b: Config) -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ between two configs, with (key, a_value, b_value)."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("kwargs", "time_kwargs", "lam_schedule", "dropout", "guidance"):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    fa, fb = flat(config_to_dict(a)), flat(config_to_dict(b))
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


# ----------------------------------------------------------------------------------------------------
# Validation of values
# ----------------------------------------------------------------------------------------------------


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}' {msg}")


def _validate_ema(t: TrainConfig) -> None:
    """The EMA keys of ``train``: one mode (per-step decay or half-life), each in its range."""
    _require(not (t.ema_decay is not None and t.ema_halflife_images is not None), "train.ema_decay",
             "and train.ema_halflife_images are exclusive: set one to null")
    if t.ema_decay is not None:
        _require(0.0 <= t.ema_decay < 1.0, "train.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
    if t.ema_halflife_images is not None:
        _require(t.ema_halflife_images > 0, "train.ema_halflife_images", "must be positive")
    if t.ema_rampup is not None:
        _require(t.ema_rampup > 0, "train.ema_rampup", "must be positive")


def _validate(cfg: Config) -> None:
    o, op, t, s, lg = cfg.objective, cfg.optim, cfg.train, cfg.sample, cfg.log
    _require(math.isfinite(o.lam) and 0.0 <= o.lam < 1.0, "objective.lam",
             f"must satisfy 0 <= lam < 1 (the ΔFM loss is unbounded below for lam >= 1), got {o.lam}")
    if o.lam_schedule is not None:
        unknown = sorted(set(o.lam_schedule) - {"kind", "start", "end", "duration"})
        if unknown:
            raise unknown_key_error(f"objective.lam_schedule.{unknown[0]}",
                                     [f"objective.lam_schedule.{k}" for k in ("kind", "start", "end", "duration")])
        for k in ("start", "end"):
            v = o.lam_schedule.get(k)
            if isinstance(v, int | float) and not isinstance(v, bool):
                _require(0.0 <= v < 1.0, f"objective.lam_schedule.{k}", f"must satisfy 0 <= lam < 1, got {v}")
    _require(0.0 <= o.label_dropout < 1.0, "objective.label_dropout", f"must be in [0, 1), got {o.label_dropout}")
    _require(op.lr > 0 and math.isfinite(op.lr), "optim.lr", f"must be a positive number, got {op.lr}")
    _require(all(0.0 <= b < 1.0 for b in op.betas), "optim.betas", f"must be in [0, 1), got {list(op.betas)}")
    _require(op.eps > 0, "optim.eps", "must be positive")
    _require(op.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(op.warmup_images >= 0, "optim.warmup_images", "must be >= 0")
    _require(not (op.fused_update and t.precision == "fp16"), "optim.fused_update",
             "cannot be used with train.precision=fp16 (its GradScaler unscales and may skip the optimizer step); "
             "use train.precision=bf16 or bf16-compute, or optim.fused_update=false")
    _require(cfg.data.workers >= 0, "data.workers", f"must be >= 0 (0: load in the training process), "
             f"got {cfg.data.workers}")
    _require(cfg.data.prefetch >= 1, "data.prefetch", f"must be >= 1 (batches per worker), got {cfg.data.prefetch}")
    _require(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    _require(t.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    _require(t.batch_size % t.grad_accum == 0, "train.batch_size",
             f"({t.batch_size}) must be divisible by train.grad_accum ({t.grad_accum})")
    _require(o.negatives == "none" or t.batch_size // t.grad_accum >= 2, "train.batch_size",
             f"({t.batch_size}) over train.grad_accum ({t.grad_accum}) leaves {t.batch_size // t.grad_accum} "
             f"sample per micro-step, but ΔFM negatives (objective.negatives={o.negatives!r}) need >= 2 samples "
             f"to draw a negative other than the anchor: use train.batch_size >= {2 * t.grad_accum}, or "
             "objective.negatives=none for plain flow matching")
    _require((t.total_images is None) != (t.steps is None), "train.total_images",
             "or train.steps: give exactly one of them (the other null)")
    if t.total_images is not None:
        _require(t.total_images >= 1, "train.total_images", "must be >= 1")
    if t.steps is not None:
        _require(t.steps >= 1, "train.steps", "must be >= 1")
    _require(t.threads is None or t.threads >= 1, "train.threads", "must be >= 1 or null")
    _require(t.compile or t.compile_mode == "default", "train.compile_mode",
             f"({t.compile_mode!r}) applies to a compiled model only: set train.compile=true as well")
    _validate_ema(t)
    _require(t.ckpt_every >= 1, "train.ckpt_every", "must be >= 1 (steps)")
    _require(t.keep_last >= 1, "train.keep_last", "must be >= 1")
    _require(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), "train.device",
             f"must be 'auto', 'cpu' or 'cuda[:N]', got {t.device!r}")
    _require(s.every >= -1, "sample.every", "must be >= -1")
    _require(s.num >= 1, "sample.num", "must be >= 1")
    close = difflib.get_close_matches(s.solver, list(SOLVERS), n=1)
    _require(s.solver in SOLVERS, "sample.solver", f"must be one of {', '.join(map(repr, SOLVERS))}, got "
             f"{s.solver!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    _require(s.steps >= get_solver(s.solver).min_steps, "sample.steps",
             f"must be >= {get_solver(s.solver).min_steps} for solver {s.solver!r}")
    _require(s.batch_size >= 1, "sample.batch_size", "must be >= 1")
    lo, hi = s.interval
    _require(0.0 <= lo <= hi <= 1.0, "sample.interval", f"must satisfy 0 <= lo <= hi <= 1, got {[lo, hi]}")
    _require(lg.every >= 1, "log.every", "must be >= 1")
    r = cfg.repa
    _require(math.isfinite(r.proj_coeff) and r.proj_coeff >= 0, "repa.proj_coeff",
             f"must be a finite number >= 0, got {r.proj_coeff}")
    _require(r.encoder_depth >= 1, "repa.encoder_depth", f"must be >= 1 (1-based block index), got {r.encoder_depth}")
    _require(r.projector_dim >= 1, "repa.projector_dim", f"must be >= 1, got {r.projector_dim}")
    names = [*r.encoders, *r.features]
    _require(len(set(names)) == len(names), "repa.encoders", f"and repa.features name each target once, got {names}")
    validate_conditioning(cfg.conditioning, cfg.objective.negatives)
    _require(lg.peak_flops is None or lg.peak_flops > 0, "log.peak_flops", "must be positive or null")
    _require(bool(lg.wandb_project.strip()) and len(lg.wandb_project) <= 128
             and not any(c in lg.wandb_project for c in _WANDB_FORBIDDEN), "log.wandb_project",
             f"must be a W&B project name: 1 to 128 characters, none of {' '.join(_WANDB_FORBIDDEN)}, "
             f"got {lg.wandb_project!r}")
    _require(lg.wandb_name is None or bool(lg.wandb_name.strip()), "log.wandb_name",
             "must be a non-empty name or null (null: the run folder's name)")


#: characters W&B does not accept in a project name
_WANDB_FORBIDDEN = ("/", "\\", "#", "?", "%", ":")
