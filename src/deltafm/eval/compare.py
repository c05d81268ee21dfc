"""``deltafm compare``: flow matching and ΔFM side by side, same seed, same data order, same budget.

    deltafm compare --config configs/compare/fmnist-unet.yaml --out runs/compare/fmnist-unet [--seeds 0 1 2]
    python -m deltafm.eval.compare --config ... --out ... [--arms fm dfm-0.05] [--dry-run] [--report-only]

A study (YAML, see ``configs/compare/``) names a base training config, **arms** (training configs given
as overrides of the base: FM is ``objective.lam: 0``, ΔFM ``lam > 0``, other negatives, other batch
sizes) and, per arm, **variants**: ways to sample the trained model (raw; with the ΔFM bias correction
v_FM = (1 − λ) v + λ ū, ``map: to_fm``; or an FM model mapped post hoc to the ΔFM optimum
v_λ = (v − λ ū) / (1 − λ), ``map: to_delta``). Every (arm, seed) is trained in-process with
:func:`deltafm.train.loop.train` and ``train.seed = seed``, so all arms of a seed start from the same
weights and read the same batches (for equal batch sizes); with uniform negatives FM (λ = 0) and ΔFM
even draw the same t, noise, label dropout and negative indices.

Evaluation stages, per variant (each a unit stored as soon as it is done):

* ``curve``: at every ``eval_every_images`` of training, ``curve.num`` samples with one sampler
  (metric against images seen);
* ``sweep``: at the end, each solver in ``sweep.solvers`` (euler, heun, sde) at each NFE in
  ``sweep.nfe`` (NFE = velocity evaluations per sample: euler/sde steps = NFE, heun steps = NFE/2;
  NFEs a solver cannot do, such as heun at 1 or sde at 1, are skipped);
* ``cfg``: at the end, classifier-free guidance scales ``cfg.scales`` (w = 1 is the unguided sweep);
* ``along``: at the end, the classifier accuracy of the predicted clean sample along t
  (:mod:`deltafm.eval.along_path`).

Metrics (:func:`deltafm.eval.features.evaluate_samples`) use the project classifier, trained on the
*training* split only (once, cached under ``OUT/classifier`` unless a path is given) and reference
statistics of the ``eval.reference_split`` (default: test) split: classifier-FD (``fd``), class accuracy
of the samples against the labels they were generated for (``class_acc``), precision/recall with k-NN
manifolds (both sets of equal size), and the Inception Score computed with the classifier (``is``).

Layout of ``OUT``::

    compare.yaml                 the resolved study
    classifier/                  classifier weights (+ .sha256) and reference statistics (.npz)
    runs/<arm>/seed<k>/          the training run (checkpoints at every evaluation point, log.jsonl)
    results/<arm>/seed<k>.json   evaluation units of that arm and seed ("status": "done" when complete)
    samples/<variant>/seed<k>.png  final sample grid of the curve sampler
    results.json                 everything collected (input of ``deltafm.eval.report``)
    report/                      REPORT.md and figures

Resuming: run the same command again. An (arm, seed) whose units are all present is skipped without
loading anything; an interrupted training continues from its newest checkpoint (``--resume auto`` of
the training loop, bit-exact on the same machine); a unit whose settings changed (sample count, seed,
classifier) is recomputed from the kept checkpoints. A changed *training* config of an arm that already
has results is an error (use another ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "STAGES",
    "CompareError",
    "CurveSpec",
    "SweepSpec",
    "CFGSpec",
    "AlongSpec",
    "EvalSpec",
    "VariantSpec",
    "ArmSpec",
    "CompareConfig",
    "load_compare_config",
    "resolve_train_config",
    "eval_points",
    "nfe_to_steps",
    "plan_units",
    "run_compare",
    "collect_results",
    "main",
]

STAGES = ("curve", "sweep", "cfg", "along")
FORMAT = "deltafm.compare.v1"
#: Bumped when the computation of a unit's metrics changes (units with another version are redone).
METRICS_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
#: Training-config keys that may change between invocations without invalidating results.
_IGNORED_KEYS = ("train.threads", "train.device", "train.ckpt_every", "train.keep_last", "train.total_images",
                 "train.steps", "log.", "sample.")


class CompareError(ValueError):
    """A study config is invalid, or existing results do not fit it."""


# ----------------------------------------------------------------------------------------------------
# The study config
# ----------------------------------------------------------------------------------------------------


@dataclass
class CurveSpec:
    """Sampler for the metric-vs-images-seen curve."""

    solver: str = "heun"
    nfe: int = 16
    num: int = 500


@dataclass
class SweepSpec:
    """Solvers × NFE grid at the end of training."""

    solvers: list[str] = field(default_factory=lambda: ["euler", "heun", "sde"])
    nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 50])
    num: int = 250


@dataclass
class CFGSpec:
    """Guidance scales at the end of training (w = 1 is off)."""

    scales: list[float] = field(default_factory=lambda: [1.5, 2.0, 3.0])
    solver: str = "heun"
    nfe: int = 16
    num: int = 250
    interval: tuple[float, float] = (0.0, 1.0)


@dataclass
class AlongSpec:
    """Classifier accuracy of x̂1 along t (Fig. 4 analogue)."""

    times: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(10)])
    num: int = 500
    trajectory_steps: int = 20


@dataclass
class EvalSpec:
    """How samples are drawn and scored."""

    classifier: str | None = None
    classifier_epochs: int = 15
    classifier_seed: int = 0
    reference_split: str = "test"
    reference_max: int | None = None
    batch_size: int = 250
    amp: str = "none"
    sample_seed: int = 1000
    pr_k: int = 3
    threads: int | None = None
    curve: CurveSpec = field(default_factory=CurveSpec)
    sweep: SweepSpec = field(default_factory=SweepSpec)
    cfg: CFGSpec = field(default_factory=CFGSpec)
    along: AlongSpec = field(default_factory=AlongSpec)


@dataclass
class VariantSpec:
    """A way to sample an arm's model: ``map`` none | to_fm (bias correction) | to_delta (post-hoc ΔFM map,
    with ``lam``). ``stages`` defaults to the arm's."""

    name: str
    map: str = "none"
    lam: float | None = None
    stages: list[str] | None = None


@dataclass
class ArmSpec:
    """A training arm: overrides of the base config, and its sampling variants.

    ``max_seeds`` limits the arm to the first n seeds of the study; ``baseline`` names the variant
    that steps-to-match / NFE-to-match compare this arm against (default: the study's).
    """

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    variants: list[VariantSpec] = field(default_factory=list)
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    max_seeds: int | None = None
    baseline: str | None = None


@dataclass
class CompareConfig:
    """A whole study; see the module docstring and ``configs/compare/*.yaml``."""

    name: str
    base: str
    arms: list[ArmSpec]
    total_images: int
    eval_every_images: int
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    overrides: dict[str, Any] = field(default_factory=dict)
    baseline: str = "fm"
    main_variants: list[str] | None = None
    description: str = ""
    eval: EvalSpec = field(default_factory=EvalSpec)
    source: str | None = None

    def variants(self) -> list[tuple[ArmSpec, VariantSpec]]:
        return [(a, v) for a in self.arms for v in a.variants]

    def variant(self, name: str) -> tuple[ArmSpec, VariantSpec]:
        for a, v in self.variants():
            if v.name == name:
                return a, v
        raise KeyError(name)

    def arm_seeds(self, arm: ArmSpec) -> list[int]:
        return list(self.seeds[: arm.max_seeds] if arm.max_seeds else self.seeds)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _strict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys (nested specs handled by the caller)."""
    if not isinstance(data, dict):
        raise CompareError(f"{where} must be a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CompareError(f"unknown key(s) {unknown} in {where}; known: {sorted(names)}")
    return cls(**data)


def _flatten_overrides(data: Any, where: str) -> dict[str, Any]:
    """Overrides as ``{"a.b": v}``; accepts a mapping of dotted keys or a list of ``"a.b=v"`` strings."""
    if data is None:
        return {}
    if isinstance(data, list):
        out = {}
        for item in data:
            if not isinstance(item, str) or "=" not in item:
                raise CompareError(f"{where}: override {item!r} must look like key.sub=value")
            k, v = item.split("=", 1)
            out[k.strip()] = yaml.safe_load(v)
        return out
    if not isinstance(data, dict):
        raise CompareError(f"{where} must be a mapping of dotted keys or a list of key=value strings")
    return {str(k): v for k, v in data.items()}


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise CompareError(f"{where}: name {name!r} must match {_NAME_RE.pattern} (used in file names)")
    return name


def _parse(data: dict[str, Any], source: str | None) -> CompareConfig:
    if not isinstance(data, dict):
        raise CompareError("a compare config must be a mapping")
    data = copy.deepcopy(data)
    ev = data.pop("eval", {}) or {}
    if not isinstance(ev, dict):
        raise CompareError("'eval' must be a mapping")
    sub = {}
    for key, cls in (("curve", CurveSpec), ("sweep", SweepSpec), ("cfg", CFGSpec), ("along", AlongSpec)):
        sub[key] = _strict(cls, ev.pop(key, {}) or {}, f"eval.{key}")
    evs = _strict(EvalSpec, {**ev, **sub}, "eval")
    evs.cfg.interval = tuple(float(x) for x in evs.cfg.interval)
    arms_raw = data.pop("arms", None)
    if not arms_raw:
        raise CompareError("a compare config needs 'arms'")
    if isinstance(arms_raw, dict):  # {name: {...}} form
        arms_raw = [{"name": k, **(v or {})} for k, v in arms_raw.items()]
    arms = []
    for i, a in enumerate(arms_raw):
        if not isinstance(a, dict):
            raise CompareError(f"arms[{i}] must be a mapping")
        a = dict(a)
        name = _check_name(a.get("name"), f"arms[{i}]")
        a["overrides"] = _flatten_overrides(a.get("overrides"), f"arms[{i}].overrides")
        variants = []
        for j, v in enumerate(a.pop("variants", None) or [{"name": name}]):
            if isinstance(v, str):
                v = {"name": v}
            vs = _strict(VariantSpec, v, f"arms[{i}].variants[{j}]")
            _check_name(vs.name, f"arms[{i}].variants[{j}]")
            variants.append(vs)
        a["variants"] = variants
        arms.append(_strict(ArmSpec, a, f"arms[{i}] ({name})"))
    data["overrides"] = _flatten_overrides(data.get("overrides"), "overrides")
    for key in ("name", "base", "total_images", "eval_every_images"):
        if key not in data:
            raise CompareError(f"a compare config needs '{key}'")
    cfg = _strict(CompareConfig, {**data, "arms": arms, "eval": evs, "source": source}, "the compare config")
    _validate(cfg)
    return cfg


def _validate(c: CompareConfig) -> None:
    _check_name(c.name, "name")
    if c.total_images < 1 or c.eval_every_images < 1 or c.total_images % c.eval_every_images:
        raise CompareError(f"total_images ({c.total_images}) must be a positive multiple of eval_every_images "
                           f"({c.eval_every_images})")
    if not c.seeds or len(set(c.seeds)) != len(c.seeds) or any(s < 0 for s in c.seeds):
        raise CompareError(f"seeds must be distinct non-negative integers, got {c.seeds}")
    names = [a.name for a in c.arms]
    if len(set(names)) != len(names):
        raise CompareError(f"arm names must be unique, got {names}")
    vnames = [v.name for _, v in c.variants()]
    if len(set(vnames)) != len(vnames):
        raise CompareError(f"variant names must be unique across arms, got {vnames}")
    for a in c.arms:
        bad = sorted(set(a.stages) - set(STAGES))
        if bad:
            raise CompareError(f"arm {a.name}: unknown stage(s) {bad}; known: {list(STAGES)}")
        if a.max_seeds is not None and a.max_seeds < 1:
            raise CompareError(f"arm {a.name}: max_seeds must be >= 1")
        for v in a.variants:
            if v.map not in ("none", "to_fm", "to_delta"):
                raise CompareError(f"variant {v.name}: map must be none, to_fm or to_delta, got {v.map!r}")
            if v.map == "to_delta" and (v.lam is None or not 0 < v.lam < 1):
                raise CompareError(f"variant {v.name}: map to_delta needs 0 < lam < 1")
            if v.map != "to_delta" and v.lam is not None:
                raise CompareError(f"variant {v.name}: lam is only used with map to_delta")
            if v.stages is not None and set(v.stages) - set(a.stages):
                raise CompareError(f"variant {v.name}: stages {v.stages} must be among its arm's {a.stages}")
    for name in [c.baseline, *[a.baseline for a in c.arms if a.baseline]]:
        if name not in vnames:
            raise CompareError(f"baseline {name!r} is not a variant; variants: {vnames}")
    for name in c.main_variants or []:
        if name not in vnames:
            raise CompareError(f"main_variants: {name!r} is not a variant")
    e = c.eval
    for solver in [*e.sweep.solvers, e.curve.solver, e.cfg.solver]:
        if solver not in ("euler", "heun", "midpoint", "rk4", "sde"):
            raise CompareError(f"unknown solver {solver!r} (euler, heun, midpoint, rk4, sde)")
    if nfe_to_steps(e.curve.solver, e.curve.nfe) is None:
        raise CompareError(f"eval.curve: solver {e.curve.solver} cannot use NFE {e.curve.nfe}")
    if nfe_to_steps(e.cfg.solver, e.cfg.nfe) is None:
        raise CompareError(f"eval.cfg: solver {e.cfg.solver} cannot use NFE {e.cfg.nfe}")
    if e.amp not in ("none", "bf16"):
        raise CompareError(f"eval.amp must be none or bf16, got {e.amp!r}")
    for what, n in (("curve", e.curve.num), ("sweep", e.sweep.num), ("cfg", e.cfg.num), ("along", e.along.num)):
        if n < 2:
            raise CompareError(f"eval.{what}.num must be >= 2")
    if e.along.trajectory_steps < 1 or any(not 0 <= t < 1 for t in e.along.times):
        raise CompareError("eval.along: trajectory_steps >= 1 and times in [0, 1)")


def load_compare_config(path: str | Path) -> CompareConfig:
    """Read and validate a study YAML (unknown keys are errors)."""
    path = Path(path)
    if not path.is_file():
        raise CompareError(f"compare config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CompareError(f"cannot parse {path}: {e}") from None
    return _parse(data or {}, str(path))


def _base_path(c: CompareConfig) -> Path:
    """The base training config: a path (relative to the study file) or a preset name."""
    from deltafm.train.config import find_preset

    p = Path(c.base)
    if not p.is_absolute() and c.source is not None:
        cand = Path(c.source).parent / p
        if cand.is_file():
            return cand
    if p.is_file():
        return p
    return find_preset(c.base)


def _base_dict(c: CompareConfig) -> dict[str, Any]:
    return yaml.safe_load(_base_path(c).read_text()) or {}


def resolve_train_config(c: CompareConfig, arm: ArmSpec, seed: int, images: int | None = None):
    """The training :class:`~deltafm.train.config.Config` of ``arm`` and ``seed``, trained up to ``images``.

    Base config, then the study's and the arm's overrides, then: ``train.seed = seed``,
    ``train.total_images = images`` (default: the study's total), checkpoints exactly at the evaluation
    points (``ckpt_every`` = one evaluation interval, all kept), no sample grids, no progress bar.
    """
    from deltafm.train.config import ConfigError, apply_overrides, config_from_dict

    data = _base_dict(c)
    data = apply_overrides(data, list(c.overrides.items()))
    data = apply_overrides(data, list(arm.overrides.items()))
    batch = int(((data.get("train") or {}).get("batch_size")) or 256)
    if c.eval_every_images % batch:
        raise CompareError(f"arm {arm.name}: eval_every_images ({c.eval_every_images}) must be a multiple of "
                           f"its batch size ({batch})")
    interval_steps = c.eval_every_images // batch
    points = c.total_images // c.eval_every_images
    data = apply_overrides(data, [
        ("train.seed", int(seed)), ("train.total_images", int(images or c.total_images)), ("train.steps", None),
        ("train.ckpt_every", interval_steps), ("train.keep_last", points + 2), ("sample.every", -1),
    ])
    log = data.setdefault("log", {}) or {}
    log.setdefault("progress_bar", False)
    log.setdefault("tensorboard", False)
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise CompareError(f"arm {arm.name}: {e}") from None


def eval_points(c: CompareConfig) -> list[int]:
    """Images seen at each evaluation of the curve: eval_every, 2·eval_every, ..., total."""
    return list(range(c.eval_every_images, c.total_images + 1, c.eval_every_images))


def nfe_to_steps(solver: str, nfe: int) -> int | None:
    """Solver steps that cost exactly ``nfe`` velocity evaluations, or None if impossible."""
    per = {"euler": 1, "sde": 1, "heun": 2, "midpoint": 2, "rk4": 4}[solver]
    if nfe < 1 or nfe % per:
        return None
    steps = nfe // per
    if solver == "sde" and steps < 2:
        return None
    return steps


# ----------------------------------------------------------------------------------------------------
# Units: what has to be computed
# ----------------------------------------------------------------------------------------------------


def _variant_stages(arm: ArmSpec, v: VariantSpec) -> list[str]:
    return list(v.stages if v.stages is not None else arm.stages)


def plan_units(c: CompareConfig, arm: ArmSpec, extractor_id: str = "") -> dict[str, dict[str, Any]]:
    """Every evaluation unit of one (arm, seed): key -> settings (a unit is redone when they change)."""
    e = c.eval
    common = {"seed": e.sample_seed, "amp": e.amp, "extractor": extractor_id, "pr_k": e.pr_k,
              "metrics_version": METRICS_VERSION}
    units: dict[str, dict[str, Any]] = {}
    for v in arm.variants:
        st = _variant_stages(arm, v)
        vkey = {"map": v.map, "lam": v.lam}
        if "curve" in st:
            for img in eval_points(c):
                units[f"curve/{v.name}/{img}"] = dict(stage="curve", variant=v.name, images=img, solver=e.curve.solver,
                                                      nfe=e.curve.nfe, num=e.curve.num, w=1.0, **vkey, **common)
        if "sweep" in st:
            for solver in e.sweep.solvers:
                for nfe in e.sweep.nfe:
                    if nfe_to_steps(solver, nfe) is None:
                        continue
                    units[f"sweep/{v.name}/{solver}/{nfe}"] = dict(
                        stage="sweep", variant=v.name, images=c.total_images, solver=solver, nfe=nfe,
                        num=e.sweep.num, w=1.0, **vkey, **common)
        if "cfg" in st:
            for w in e.cfg.scales:
                units[f"cfg/{v.name}/{float(w):g}"] = dict(
                    stage="cfg", variant=v.name, images=c.total_images, solver=e.cfg.solver, nfe=e.cfg.nfe,
                    num=e.cfg.num, w=float(w), interval=list(e.cfg.interval), **vkey, **common)
        if "along" in st:
            units[f"along/{v.name}"] = dict(stage="along", variant=v.name, images=c.total_images,
                                            times=list(e.along.times), num=e.along.num,
                                            steps=e.along.trajectory_steps, split=e.reference_split,
                                            **vkey, **common)
    return units


def _forwards(units: dict[str, dict[str, Any]]) -> int:
    """Model forward passes per image summed over units (a cost estimate)."""
    total = 0
    for u in units.values():
        if u["stage"] == "along":
            total += u["num"] * (2 * len(u["times"]) + u["steps"])
        else:
            total += u["num"] * u["nfe"] * (2 if u["w"] != 1.0 else 1)
    return total


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # unique: two compare processes may share OUT
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    from deltafm.train.config import config_from_dict, config_to_dict

    flat: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and k not in ("kwargs", "time_kwargs", "lam_schedule"):
                walk(v, key + ".")
            elif not any(key == i or (i.endswith(".") and key.startswith(i)) for i in _IGNORED_KEYS):
                flat[key] = v

    walk(config_to_dict(config_from_dict(cfg_dict)), "")
    return flat


class _Log:
    def __init__(self, path: Path | None, quiet: bool = False) -> None:
        self.path, self.quiet = path, quiet

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        if not self.quiet:
            print(line, flush=True)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write(line + "\n")


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------


class Evaluator:
    """Classifier, reference statistics and the sampling/scoring of one checkpoint's variants."""

    def __init__(self, c: CompareConfig, out: Path, device: str, log: _Log, classifier: str | None = None) -> None:
        import torch

        from deltafm.eval.classifier import load_classifier, load_split, save_classifier, train_classifier
        from deltafm.eval.features import reference_statistics
        from deltafm.eval.metrics import load_reference_stats, save_reference_stats
        from deltafm.train.config import config_from_dict

        self.c, self.out, self.device, self.log = c, out, device, log
        base = config_from_dict(apply_study_overrides(c))
        self.dataset = base.data.name
        self.data_root = base.data.root
        path = classifier or c.eval.classifier
        if path is None:
            path = str(out / "classifier" / f"{self.dataset}-classifier.safetensors")
            if not Path(path).is_file():
                log(f"training the feature classifier on the {self.dataset} train split "
                    f"({c.eval.classifier_epochs} epochs) -> {path}")
                train = load_split(self.dataset, "train")
                test = load_split(self.dataset, c.eval.reference_split)
                model = train_classifier(train, epochs=c.eval.classifier_epochs, seed=c.eval.classifier_seed,
                                         dataset_test=test, progress=False)
                save_classifier(model, path)
        self.classifier = load_classifier(path).to(device).eval()
        self.classifier_path = str(path)
        self.extractor_id = self.classifier.extractor_id
        acc = self.classifier.meta.get("test_accuracy")
        log(f"classifier {path} ({self.extractor_id[:23]}...), test accuracy {acc}")
        ref_path = out / "classifier" / f"ref-{self.dataset}-{c.eval.reference_split}.npz"
        ref = load_reference_stats(ref_path) if ref_path.is_file() else None
        if ref is None or ref.meta.get("extractor") != self.extractor_id or \
                ref.meta.get("max_items") != c.eval.reference_max:
            split = load_split(self.dataset, c.eval.reference_split)
            imgs = split.images if c.eval.reference_max is None else split.images[: c.eval.reference_max]
            ref = reference_statistics(self.classifier, imgs, meta={
                "dataset": self.dataset, "split": c.eval.reference_split, "max_items": c.eval.reference_max},
                device=device, progress=False)
            ref_path.parent.mkdir(parents=True, exist_ok=True)
            save_reference_stats(ref_path, ref.mu, ref.sigma, ref.features, ref.meta)
        self.ref = ref
        self.reference_path = str(ref_path)
        self.amp = torch.bfloat16 if c.eval.amp == "bf16" else None
        self._test = None

    def info(self) -> dict[str, Any]:
        m = self.classifier.meta
        return {"path": self.classifier_path, "id": self.extractor_id, "test_accuracy": m.get("test_accuracy"),
                "dataset": m.get("dataset"), "recipe": m.get("recipe"), "train_seconds": m.get("train_seconds"),
                "reference": {"path": self.reference_path, **self.ref.meta}}

    def correction(self, lm: Any, u: dict[str, Any]):
        """The BiasCorrection of a variant (None for raw sampling)."""
        if u["map"] == "none":
            return None
        if not lm.objective.mean_target.initialized:
            raise CompareError(f"{lm.checkpoint} stores no mean target: cannot apply map {u['map']}")
        if u["map"] == "to_fm":
            lam = lm.objective.lam_at(lm.images_seen)
            if lam <= 0:
                return None
            return lm.objective.bias_correction(direction="to_fm", lam=lam)
        return lm.objective.bias_correction(direction="to_delta", lam=float(u["lam"]))

    def score(self, images: Any, labels: Any) -> dict[str, Any]:
        """FD, class accuracy, precision/recall and IS of uint8 NHWC samples generated for ``labels``.

        FD uses the eigendecomposition form of tr((Σ₁Σ₂)^{1/2}) (exact for covariance matrices and
        ~100x faster than ``scipy.linalg.sqrtm`` on rank-deficient 128x128 products). Precision/recall
        compare the samples with an equally large, seeded subset of the reference features.
        """
        import numpy as np
        import torch

        from deltafm.eval.features import extract
        from deltafm.eval.metrics import feature_statistics, frechet_distance, inception_score, precision_recall

        f = extract(self.classifier, images, batch_size=self.c.eval.batch_size, layout="NHWC", device=self.device,
                    progress=False)
        mu, sigma = feature_statistics(f.features)
        out: dict[str, Any] = {"fd": frechet_distance(mu, sigma, self.ref.mu, self.ref.sigma, method="eigh")}
        pred = f.logits.argmax(axis=1)
        out["class_acc"] = float((pred == np.asarray(labels)).mean())
        probs = torch.softmax(torch.from_numpy(f.logits), dim=1).numpy()
        out["is"] = inception_score(probs, splits=1)[0]
        if self.ref.features is not None:
            g = np.random.default_rng(0)
            n = min(len(images), len(self.ref.features))
            real = self.ref.features[np.sort(g.permutation(len(self.ref.features))[:n])]
            out["precision"], out["recall"] = precision_recall(real, f.features, k=self.c.eval.pr_k)
        return out

    def sample_unit(self, lm: Any, u: dict[str, Any], grid_to: Path | None = None) -> dict[str, Any]:
        from deltafm.sampling import generate, labels_for, save_grid, to_uint8_nhwc

        t0 = time.perf_counter()
        k = lm.data.num_classes
        labels = labels_for(u["num"], k)
        x = generate(lm.model, labels=labels, shape=(lm.data.channels, lm.data.image_size, lm.data.image_size),
                     num_classes=k, solver=u["solver"], steps=nfe_to_steps(u["solver"], u["nfe"]), cfg=u["w"],
                     interval=tuple(u.get("interval", (0.0, 1.0))), correction=self.correction(lm, u),
                     seed=u["seed"], batch_size=self.c.eval.batch_size, device=self.device,
                     path=lm.objective.path, amp_dtype=self.amp)
        imgs = to_uint8_nhwc(x)
        if grid_to is not None:
            order = [i for c_ in range(k) for i in range(c_, min(len(imgs), 10 * k), k)]
            save_grid(imgs[order], grid_to, ncol=10)
        out = self.score(imgs, labels.numpy())
        sample_s = time.perf_counter() - t0
        return {**out, "seconds": round(sample_s, 2)}

    def test_subset(self, num: int):
        """``num`` test images (model space) and labels: a fixed seeded subset of the reference split."""
        import torch

        from deltafm.data import load_dataset, uint8_to_model

        if self._test is None:
            self._test = load_dataset(self.dataset, root=self.data_root, split=self.c.eval.reference_split)
        ds = self._test
        g = torch.Generator().manual_seed(12345)
        idx = torch.randperm(len(ds), generator=g)[:num].sort().values
        return uint8_to_model(ds.images[idx]), ds.labels[idx]

    def along_unit(self, lm: Any, u: dict[str, Any]) -> dict[str, Any]:
        from deltafm.eval.along_path import noised_accuracy, trajectory_accuracy
        from deltafm.sampling import labels_for

        t0 = time.perf_counter()
        k = lm.data.num_classes
        corr = self.correction(lm, u)
        common = dict(num_classes=k, path=lm.objective.path, correction=corr, seed=u["seed"],
                      batch_size=self.c.eval.batch_size, amp_dtype=self.amp, device=self.device)
        x1, y = self.test_subset(u["num"])
        times = list(u["times"])
        acc_c = noised_accuracy(lm.model, self.classifier, x1, y, times, null_label=False, **common)
        acc_n = noised_accuracy(lm.model, self.classifier, x1, y, times, null_label=True, **common)
        tt, acc_t = trajectory_accuracy(lm.model, self.classifier, labels_for(u["num"], k),
                                        (lm.data.channels, lm.data.image_size, lm.data.image_size),
                                        steps=u["steps"], **common)
        return {"trajectory": {"t": tt, "acc": acc_t}, "noised_class": {"t": times, "acc": acc_c},
                "noised_null": {"t": times, "acc": acc_n}, "seconds": round(time.perf_counter() - t0, 2)}


def apply_study_overrides(c: CompareConfig) -> dict[str, Any]:
    """The base training config with the study-wide overrides, as a dict."""
    from deltafm.train.config import apply_overrides

    return apply_overrides(_base_dict(c), list(c.overrides.items()))


# ----------------------------------------------------------------------------------------------------
# Running one (arm, seed)
# ----------------------------------------------------------------------------------------------------


def _ckpt_at(run_dir: Path, step: int) -> Path | None:
    from deltafm.train.checkpoint import step_dir_name

    p = run_dir / "checkpoints" / step_dir_name(step)
    return p if (p / "COMPLETE").is_file() else None


def _train_to(c: CompareConfig, arm: ArmSpec, seed: int, images: int, run_dir: Path, rec: dict[str, Any],
              log: _Log) -> None:
    import torch

    from deltafm.train.loop import train

    cfg = resolve_train_config(c, arm, seed, images)
    t0 = time.perf_counter()
    log(f"train {arm.name} seed {seed} up to {images} images ({images // cfg.train.batch_size} steps)")
    with torch.random.fork_rng(devices=[]):
        res = train(cfg, run_dir, resume="auto")
    rec["train"]["seconds"] = round(rec["train"].get("seconds", 0.0) + time.perf_counter() - t0, 1)
    if res.status != "done":
        raise KeyboardInterrupt(f"training of {arm.name} seed {seed} was interrupted at step {res.step}")


def run_arm_seed(c: CompareConfig, arm: ArmSpec, seed: int, out: Path, ev: Evaluator | None, get_ev: Any,
                 log: _Log, train_only: bool = False) -> dict[str, Any]:
    """Train (or continue) one arm for one seed and compute its missing units; returns its record.

    ``train_only``: only make sure the run is trained to the end (checkpoints at every evaluation point
    are kept), without loading the classifier or evaluating anything.
    """
    from deltafm.sampling import load_for_sampling
    from deltafm.train.config import config_to_dict

    res_path = out / "results" / arm.name / f"seed{seed}.json"
    run_dir = out / "runs" / arm.name / f"seed{seed}"
    full_cfg = resolve_train_config(c, arm, seed)
    cfg_dict = config_to_dict(full_cfg)
    rec = _read_json(res_path) or {"arm": arm.name, "seed": seed, "status": "partial", "units": {},
                                   "train": {"seconds": 0.0}}
    if rec.get("train_config") is not None:
        old, new = _comparable(rec["train_config"]), _comparable(cfg_dict)
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise CompareError(f"{res_path} was made with another training config (differs in {diff}); use "
                               f"another --out, or delete {res_path} and {run_dir}")
    rec["train_config"] = cfg_dict
    rec["train"].update(batch_size=full_cfg.train.batch_size, lam=full_cfg.objective.lam,
                        negatives=full_cfg.objective.negatives, model=full_cfg.model.name,
                        total_images=c.total_images)
    if train_only:
        final = _ckpt_at(run_dir, c.total_images // full_cfg.train.batch_size)
        if final is None:
            _train_to(c, arm, seed, c.total_images, run_dir, rec, log)
            _write_json(res_path, rec)
        else:
            log(f"skip training {arm.name} seed {seed}: {final} exists")
        return rec
    extractor_id = ev.extractor_id if ev is not None else _cached_extractor_id(out, c)
    units = plan_units(c, arm, extractor_id or "")
    done = rec["units"]
    todo = {k: u for k, u in units.items() if k not in done or done[k].get("settings") != u}
    if not todo and extractor_id:
        if rec.get("status") != "done":
            rec["status"] = "done"
            _write_json(res_path, rec)
        log(f"skip {arm.name} seed {seed}: all {len(units)} units done")
        return rec
    ev = ev or get_ev()
    units = plan_units(c, arm, ev.extractor_id)
    todo = {k: u for k, u in units.items() if k not in done or done[k].get("settings") != u}
    batch = full_cfg.train.batch_size
    by_images: dict[int, list[str]] = {}
    for k, u in todo.items():
        by_images.setdefault(u["images"], []).append(k)
    for images in eval_points(c):
        step = images // batch
        keys = by_images.get(images, [])
        ckpt = _ckpt_at(run_dir, step)
        if ckpt is None and (keys or images == c.total_images):
            _train_to(c, arm, seed, images, run_dir, rec, log)
            _write_json(res_path, rec)
            ckpt = _ckpt_at(run_dir, step)
            if ckpt is None:
                raise CompareError(f"training did not leave a checkpoint at step {step} in {run_dir}")
        if not keys:
            continue
        lm = load_for_sampling(ckpt, ema=True, device=ev.device)
        for key in sorted(keys, key=lambda k: (todo[k]["stage"] != "curve", k)):
            u = todo[key]
            t0 = time.perf_counter()
            if u["stage"] == "along":
                metrics = ev.along_unit(lm, u)
            else:
                grid = None
                if u["stage"] == "curve" and images == c.total_images:
                    grid = out / "samples" / u["variant"] / f"seed{seed}.png"
                metrics = ev.sample_unit(lm, u, grid_to=grid)
            done[key] = {"settings": u, "step": lm.step, "images": lm.images_seen, "metrics": metrics}
            _write_json(res_path, rec)
            if u["stage"] == "along":
                summary = "traj acc " + " ".join(f"{a:.2f}" for a in metrics["trajectory"]["acc"][::5])
            else:
                summary = f"fd {metrics['fd']:.2f} acc {metrics['class_acc']:.3f}"
            log(f"  {arm.name} s{seed} {key}: {summary} ({time.perf_counter() - t0:.0f}s)")
    rec["status"] = "done"
    _write_json(res_path, rec)
    return rec


def _cached_extractor_id(out: Path, c: CompareConfig) -> str | None:
    """The classifier id recorded by an earlier invocation (to skip finished arms without loading it)."""
    info = _read_json(out / "classifier" / "classifier.json")
    if info is None:
        return None
    want = c.eval.classifier or str(out / "classifier" / f"{info.get('dataset_name', '')}-classifier.safetensors")
    if info.get("path") != want:
        return None
    from deltafm.eval.classifier import file_sha256

    if not Path(want).is_file() or f"classifier:{file_sha256(want)}" != info.get("id"):
        return None
    return info.get("id")


# ----------------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------------


def collect_results(c: CompareConfig, out: Path, classifier_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Gather ``OUT/results/*/seed*.json`` into the ``results.json`` structure read by the report."""
    arms_meta = []
    runs = []
    for a in c.arms:
        try:
            cfg = resolve_train_config(c, a, c.arm_seeds(a)[0])
            meta = {"batch_size": cfg.train.batch_size, "lam": cfg.objective.lam, "negatives": cfg.objective.negatives,
                    "model": cfg.model.name}
        except Exception:  # noqa: BLE001 - informational only
            meta = {}
        arms_meta.append({"name": a.name, "seeds": c.arm_seeds(a), "baseline": a.baseline or c.baseline,
                          "stages": a.stages, "overrides": a.overrides,
                          "variants": [dataclasses.asdict(v) for v in a.variants], **meta})
        for seed in c.arm_seeds(a):
            rec = _read_json(out / "results" / a.name / f"seed{seed}.json")
            if rec is None:
                continue
            variants: dict[str, dict[str, Any]] = {}
            for _key, unit in sorted(rec["units"].items()):
                s, m = unit["settings"], unit["metrics"]
                v = variants.setdefault(s["variant"], {"curve": [], "sweep": [], "cfg": [], "along": None})
                row = {"images": unit["images"], "step": unit["step"], "solver": s.get("solver"), "nfe": s.get("nfe"),
                       "w": s.get("w"), "num": s["num"]}
                if s["stage"] == "along":
                    v["along"] = {k: m[k] for k in ("trajectory", "noised_class", "noised_null")}
                else:
                    v[s["stage"]].append({**row, **{k: m.get(k) for k in ("fd", "class_acc", "precision", "recall",
                                                                          "is", "seconds")}})
            for v in variants.values():
                v["curve"].sort(key=lambda r: r["images"])
                v["sweep"].sort(key=lambda r: (r["solver"], r["nfe"]))
                v["cfg"].sort(key=lambda r: r["w"])
            runs.append({"arm": a.name, "seed": seed, "status": rec.get("status"), "train": rec.get("train", {}),
                         "variants": variants})
    study = c.to_dict()
    study["arms"] = arms_meta
    return {"format": FORMAT, "study": study, "classifier": classifier_info or _read_json(
        out / "classifier" / "classifier.json"), "runs": runs}


def run_compare(c: CompareConfig, out: str | Path, *, arms: list[str] | None = None, device: str = "cpu",
                threads: int | None = None, classifier: str | None = None, report: bool = True,
                quiet: bool = False, train_only: bool = False) -> dict[str, Any]:
    """Run (or continue) the study into ``out``; returns the collected results (also in results.json).

    ``train_only`` trains the selected arms without evaluating (a later call evaluates their kept
    checkpoints)."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = _Log(out / "compare.log", quiet=quiet)
    if classifier is not None:
        c.eval.classifier = classifier
    (out / "compare.yaml").write_text(yaml.safe_dump(c.to_dict(), sort_keys=False))
    threads = threads or c.eval.threads
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    selected = [a for a in c.arms if arms is None or a.name in arms]
    if arms is not None and len(selected) != len(set(arms)):
        raise CompareError(f"unknown arm(s) {sorted(set(arms) - {a.name for a in c.arms})}")
    holder: dict[str, Evaluator] = {}

    def get_ev() -> Evaluator:
        if "ev" not in holder:
            ev = Evaluator(c, out, device, log)
            _write_json(out / "classifier" / "classifier.json", {**ev.info(), "dataset_name": ev.dataset})
            holder["ev"] = ev
        return holder["ev"]

    t0 = time.perf_counter()
    log(f"compare {c.name}: arms {[a.name for a in selected]}, seeds {c.seeds}, {c.total_images} images each, "
        f"out {out}")
    try:
        for seed in c.seeds:  # seed-major: a partial study has complete seeds first
            for a in selected:
                if seed not in c.arm_seeds(a):
                    continue
                if threads:
                    torch.set_num_threads(threads)
                run_arm_seed(c, a, seed, out, holder.get("ev"), get_ev, log, train_only=train_only)
    finally:
        torch.set_num_threads(before)
    info = holder["ev"].info() if "ev" in holder else None
    results = collect_results(c, out, info)
    _write_json(out / "results.json", results)
    log(f"compare {c.name}: finished in {time.perf_counter() - t0:.0f}s; results in {out / 'results.json'}")
    if report:
        from deltafm.eval.report import write_report

        md = write_report(out / "results.json", out / "report")
        log(f"report: {md}")
    return results


def _dry_run(c: CompareConfig, seeds: list[int]) -> str:
    from deltafm.train.config import config_from_dict, diff_configs

    lines = [f"study {c.name}: base {_base_path(c)}, seeds {seeds}, {c.total_images} images per run, "
             f"evaluated at {eval_points(c)}", f"baseline variant: {c.baseline}", ""]
    base = config_from_dict(apply_study_overrides(c))
    tot_train = tot_sample = 0
    for a in c.arms:
        s = c.arm_seeds(a)
        cfg = resolve_train_config(c, a, s[0])
        diff = [(k, x, y) for k, x, y in diff_configs(base, cfg)
                if not k.startswith(("train.seed", "train.ckpt_every", "train.keep_last", "sample.", "log.",
                                     "train.total_images", "train.steps"))]
        units = plan_units(c, a)
        fw = _forwards(units)
        tot_train += c.total_images * len(s)
        tot_sample += fw * len(s)
        lines.append(f"arm {a.name}: seeds {s}; batch {cfg.train.batch_size}, {c.total_images // cfg.train.batch_size}"
                     f" steps; differs from base in " + (", ".join(f"{k}={y!r}" for k, _, y in diff) or "nothing"))
        for v in a.variants:
            lines.append(f"    variant {v.name}: map {v.map}" + (f" (lam {v.lam})" if v.lam else "")
                         + f", stages {_variant_stages(a, v)}")
        lines.append(f"    {len(units)} evaluation units per seed, {fw / 1e6:.2f}M sample forward passes per seed")
    lines.append("")
    lines.append(f"total: {tot_train / 1e6:.2f}M training images (≈ {3 * tot_train / 1e6:.2f}M forward-equivalents),"
                 f" {tot_sample / 1e6:.2f}M sampling forward passes")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltafm compare",
                                description="Train FM and ΔFM arms from one seed and data order, evaluate them "
                                            "along training and over NFE, write results.json and a report.")
    p.add_argument("--config", type=Path, required=True, help="study YAML (configs/compare/*.yaml)")
    p.add_argument("--out", type=Path, help="output folder (default runs/compare/<name>)")
    p.add_argument("--seeds", type=int, nargs="+", help="replace the study's seeds")
    p.add_argument("--arms", nargs="+", help="run only these arms")
    p.add_argument("--classifier", help="feature classifier .safetensors (default: eval.classifier, or trained "
                                        "once into OUT/classifier)")
    p.add_argument("--threads", type=int, help="torch threads for evaluation (training uses train.threads)")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto (evaluation)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the per-arm configs, then exit")
    p.add_argument("--report-only", action="store_true", help="collect existing results and write the report")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--train-only", action="store_true",
                   help="only train the arms (all evaluation checkpoints are kept); evaluate with a later call")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``deltafm compare``; 0 on success, 2 on bad input, 1 when interrupted."""
    args = build_parser().parse_args(argv)
    from deltafm.train.checkpoint import CheckpointError
    from deltafm.train.config import ConfigError
    from deltafm.train.loop import NonFiniteLossError, SetupError

    try:
        c = load_compare_config(args.config)
        if args.seeds:
            c.seeds = list(args.seeds)
            _validate(c)
        out = args.out or Path("runs") / "compare" / c.name
        if args.dry_run:
            print(_dry_run(c, c.seeds))
            return 0
        device = args.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.report_only:
            from deltafm.eval.report import write_report

            _write_json(out / "results.json", collect_results(c, out))
            print(write_report(out / "results.json", out / "report"))
            return 0
        run_compare(c, out, arms=args.arms, device=device, threads=args.threads, classifier=args.classifier,
                    report=not (args.no_report or args.train_only), quiet=args.quiet, train_only=args.train_only)
    except (CompareError, ConfigError, CheckpointError, SetupError, NonFiniteLossError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}; run the same command again to continue", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

