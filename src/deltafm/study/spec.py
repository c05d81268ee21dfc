"""The study spec: the YAML of ``configs/compare/*.yaml`` as typed dataclasses, validated.

A study names a base training config, **arms** (training configs given as overrides of the base) and,
per arm, **variants** (ways to sample the trained model). The YAML is turned into :class:`CompareConfig`
by the package's one typed-config engine (:mod:`deltafm.typed_config`: the training config's coercion,
so ``total_images: 1e6`` is an int, and unknown keys are errors naming the dotted key with the closest
valid one); :func:`validate` then checks the relations between values.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deltafm.solvers import nfe_to_steps, solver_names
from deltafm.typed_config import ConfigError, build, coerce, read_yaml

__all__ = [
    "STAGES",
    "SCORERS",
    "PROMPT_SPLITS",
    "CompareError",
    "CurveSpec",
    "SweepSpec",
    "CFGSpec",
    "AlongSpec",
    "EvalSpec",
    "VariantSpec",
    "ArmSpec",
    "CompareConfig",
    "parse_compare_config",
    "load_compare_config",
    "validate",
    "base_path",
    "apply_study_overrides",
]

STAGES = ("curve", "sweep", "cfg", "along")
#: How samples are scored: the feature classifier (class-conditional arms) or the shapes attribute reader.
SCORERS = ("classifier", "attributes")
#: Splits of the shapes sets whose first items' captions (conditions) are the prompts (deltafm.data.shapes_dataset).
PROMPT_SPLITS = ("train", "test", "heldout", "all")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class CompareError(ConfigError):
    """A study config is invalid, or existing results do not fit it."""


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
    """Guidance scales at the end of training (w = 1 is off).

    ``scales`` are joint: every condition (the class, the text, all parts of a multi-condition) is nulled at
    once. ``part_scales`` (multi-condition arms only) maps a part to weights w: one unit per (part, w) that
    guides only that part (compositional CFG, v(c) + (w − 1)(v(c) − v(c without the part)); the other parts at
    weight 1, unguided), e.g. ``{shape: [2.0, 4.0]}``. A checkpoint's own ``conditioning.guidance`` weights are
    not used here."""

    scales: list[float] = field(default_factory=lambda: [1.5, 2.0, 3.0])
    solver: str = "heun"
    nfe: int = 16
    num: int = 250
    interval: tuple[float, float] = (0.0, 1.0)
    part_scales: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class AlongSpec:
    """Classifier accuracy of x̂1 along t (Fig. 4 analogue)."""

    times: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(10)])
    num: int = 500
    trajectory_steps: int = 20


@dataclass
class EvalSpec:
    """How samples are drawn and scored.

    Arms trained on VAE latents (``data.name: latents``) are scored on decoded images: ``images`` names the
    pixel dataset the classifier and the reference statistics use (keys of the training config's ``data``
    section, e.g. ``{name: fashion-mnist}``), and ``vae`` may override the VAE recorded with the latents
    (:mod:`deltafm.vae.decoding`). The ``along`` stage needs pixel arms.

    ``scorer``: ``classifier`` (default: class-conditional arms, the feature classifier) or ``attributes``
    (text and multi-condition arms on the shapes sets, read back by the attribute reader at ``reader``). With
    ``attributes`` a sampling unit is drawn once per split of ``prompt_splits`` (a split name or a list; default
    ``[test]``: seen (shape, colour) pairs; ``heldout``: held-out pairs): sample i is conditioned on the caption
    (text arms) or the conditions (multi arms) of item i of the split, and FD is taken against the reader's
    features of the split's first ``reference_max`` real images (default: all of them; ``reference_split`` is
    the classifier's).

    ``sample_seeds`` (a list, replacing ``sample_seed``): every sampling unit draws its ``num`` samples once
    per seed (independent sampling noise, the same model) and scores each set; a metric is the mean over the
    seeds, and ``per_seed`` keeps each seed's values (the sampling error of the metric). ``kid_subsets`` > 0
    adds KID beside FD (:mod:`deltafm.eval.kid`: that many subsets of ``kid_subset_size`` rows). Both are
    recorded in a unit's settings only when used, so the units of studies without them stay valid."""

    scorer: str = "classifier"
    reader: str | None = None
    prompt_splits: list[str] = field(default_factory=lambda: ["test"])
    classifier: str | None = None
    classifier_epochs: int = 15
    classifier_seed: int = 0
    reference_split: str = "test"
    reference_max: int | None = None
    batch_size: int = 250
    amp: str = "none"
    sample_seed: int = 1000
    sample_seeds: list[int] | None = None
    kid_subsets: int = 0
    kid_subset_size: int = 1000
    pr_k: int = 3
    threads: int | None = None
    images: dict[str, Any] | None = None
    vae: str | None = None
    curve: CurveSpec = field(default_factory=CurveSpec)
    sweep: SweepSpec = field(default_factory=SweepSpec)
    cfg: CFGSpec = field(default_factory=CFGSpec)
    along: AlongSpec = field(default_factory=AlongSpec)


@dataclass
class VariantSpec:
    """A way to sample an arm's model: ``map`` none | to_fm (bias correction) | to_delta (post-hoc ΔFM map,
    with ``lam``), acting ``correction`` = always (every t) or guidance (only for t inside the CFG interval,
    the reference code's rule). ``stages`` defaults to the arm's."""

    name: str
    map: str = "none"
    lam: float | None = None
    stages: list[str] | None = None
    correction: str = "always"


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
    """A whole study; see :mod:`deltafm.study` and ``configs/compare/*.yaml``."""

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
    comparisons: list[list[str]] = field(default_factory=list)  # extra [variant, baseline] pairs, with CIs
    #: equivalence margins per metric (e.g. {fd: 0.25}) for the comparisons' TOST verdict (study.paired)
    equivalence: dict[str, float] = field(default_factory=dict)

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
        """The study as plain data; the scorer keys are left out at their defaults (classifier studies record
        exactly what they did before those keys existed)."""
        d = dataclasses.asdict(self)
        ev = d["eval"]
        if ev["scorer"] == "classifier":
            for key in ("scorer", "reader", "prompt_splits"):
                del ev[key]
        if not ev["cfg"]["part_scales"]:
            del ev["cfg"]["part_scales"]
        if not d["equivalence"]:
            del d["equivalence"]
        for key, default in (("sample_seeds", None), ("kid_subsets", 0), ("kid_subset_size", 1000)):
            if ev[key] == default:  # recorded only when used (older studies record what they did)
                del ev[key]
        return d


# ----------------------------------------------------------------------------------------------------
# Parsing: normalise the shorthand forms, then the typed engine
# ----------------------------------------------------------------------------------------------------


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


def _normalise_arm(i: int, a: Any) -> dict[str, Any]:
    """One arm in the canonical form: flat overrides, variants as mappings (default: one named as the arm)."""
    if not isinstance(a, dict):
        raise CompareError(f"arms[{i}] must be a mapping")
    a = dict(a)
    name = _check_name(a.get("name"), f"arms[{i}]")
    a["overrides"] = _flatten_overrides(a.get("overrides"), f"arms[{i}].overrides")
    variants = a.get("variants") or [{"name": name}]
    if not isinstance(variants, list):
        raise CompareError(f"arms[{i}].variants must be a list")
    a["variants"] = [{"name": v} if isinstance(v, str) else v for v in variants]
    for j, v in enumerate(a["variants"]):
        if isinstance(v, dict):
            _check_name(v.get("name"), f"arms[{i}].variants[{j}]")
    return a


def _normalise(data: Any) -> dict[str, Any]:
    """The study mapping in the canonical form the dataclasses take (shorthands expanded, nulls dropped)."""
    if not isinstance(data, dict):
        raise CompareError("a compare config must be a mapping")
    data = copy.deepcopy(data)
    ev = data.get("eval") or {}
    if not isinstance(ev, dict):
        raise CompareError("'eval' must be a mapping")
    data["eval"] = {k: v for k, v in ev.items() if not (k in ("curve", "sweep", "cfg", "along") and v is None)}
    if isinstance(data["eval"].get("prompt_splits"), str):  # one split may be given without a list
        data["eval"]["prompt_splits"] = [data["eval"]["prompt_splits"]]
    arms = data.get("arms")
    if not arms:
        raise CompareError("a compare config needs 'arms'")
    if isinstance(arms, dict):  # {name: {...}} form
        arms = [{"name": k, **(v or {})} for k, v in arms.items()]
    if not isinstance(arms, list):
        raise CompareError("'arms' must be a list (or a mapping of name -> arm)")
    data["arms"] = [_normalise_arm(i, a) for i, a in enumerate(arms)]
    data["overrides"] = _flatten_overrides(data.get("overrides"), "overrides")
    for key in ("name", "base", "total_images", "eval_every_images"):
        if key not in data:
            raise CompareError(f"a compare config needs '{key}'")
    return data


def parse_compare_config(data: Any, source: str | None = None) -> CompareConfig:
    """Build and validate a study from its parsed YAML (``source``: the file it came from)."""
    data = _normalise(data)
    c = build(CompareConfig, {**data, "source": source}, error=CompareError, noun="key")
    validate(c)
    return c


def load_compare_config(path: str | Path) -> CompareConfig:
    """Read and validate a study YAML (unknown keys are errors)."""
    data = read_yaml(path, error=CompareError, what="compare config")
    return parse_compare_config(data or {}, str(path))


# ----------------------------------------------------------------------------------------------------
# Validation of values
# ----------------------------------------------------------------------------------------------------


def _validate_variant(a: ArmSpec, v: VariantSpec) -> None:
    if v.map not in ("none", "to_fm", "to_delta"):
        raise CompareError(f"variant {v.name}: map must be none, to_fm or to_delta, got {v.map!r}")
    if v.map == "to_delta" and (v.lam is None or not 0 < v.lam < 1):
        raise CompareError(f"variant {v.name}: map to_delta needs 0 < lam < 1")
    if v.correction not in ("always", "guidance"):
        raise CompareError(f"variant {v.name}: correction must be always or guidance, got {v.correction!r}")
    if v.map == "none" and v.correction != "always":
        raise CompareError(f"variant {v.name}: correction {v.correction!r} needs a map (to_fm or to_delta)")
    if v.map != "to_delta" and v.lam is not None:
        raise CompareError(f"variant {v.name}: lam is only used with map to_delta")
    if v.stages is not None and set(v.stages) - set(a.stages):
        raise CompareError(f"variant {v.name}: stages {v.stages} must be among its arm's {a.stages}")


def _validate_arms(c: CompareConfig) -> None:
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
            _validate_variant(a, v)
    for name in [c.baseline, *[a.baseline for a in c.arms if a.baseline]]:
        if name not in vnames:
            raise CompareError(f"baseline {name!r} is not a variant; variants: {vnames}")
    for name in c.main_variants or []:
        if name not in vnames:
            raise CompareError(f"main_variants: {name!r} is not a variant")
    for pair in c.comparisons:
        if len(pair) != 2 or pair[0] == pair[1] or any(n not in vnames for n in pair):
            raise CompareError(f"comparisons: each entry must be [variant, baseline], two different variants, got "
                               f"{pair}; variants: {vnames}")
    for metric, margin in c.equivalence.items():
        if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin > 0):
            raise CompareError(f"equivalence.{metric}: the margin must be a number > 0, got {margin!r}")


def _validate_eval(e: EvalSpec) -> None:
    known = solver_names(fixed_nfe=True)
    for solver in [*e.sweep.solvers, e.curve.solver, e.cfg.solver]:
        if solver not in known:
            raise CompareError(f"unknown solver {solver!r} ({', '.join(known)})")
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
    if e.sample_seeds is not None and (not e.sample_seeds or len(set(e.sample_seeds)) != len(e.sample_seeds)):
        raise CompareError(f"eval.sample_seeds must be a non-empty list of distinct seeds, got {e.sample_seeds}")
    if e.kid_subsets < 0 or e.kid_subset_size < 2:
        raise CompareError(f"eval.kid_subsets must be >= 0 (0: no KID) and eval.kid_subset_size >= 2, got "
                           f"{e.kid_subsets} and {e.kid_subset_size}")
    _validate_scorer(e)


def _validate_scorer(e: EvalSpec) -> None:
    """The scorer, its reader and prompt splits, per-part guidance weights."""
    if e.scorer not in SCORERS:
        raise CompareError(f"eval.scorer must be one of {', '.join(SCORERS)}, got {e.scorer!r}")
    for part, ws in list(e.cfg.part_scales.items()):
        ws = coerce(ws, list[float], f"eval.cfg.part_scales.{part}", error=CompareError, noun="key")
        if not ws or any(not math.isfinite(w) or w < 0 for w in ws):
            raise CompareError(f"eval.cfg.part_scales.{part} must be a non-empty list of finite weights >= 0, "
                               f"got {ws}")
        e.cfg.part_scales[part] = ws
    if e.scorer == "classifier":
        for key, bad in (("reader", e.reader is not None), ("prompt_splits", e.prompt_splits != ["test"]),
                         ("cfg.part_scales", bool(e.cfg.part_scales))):
            if bad:
                raise CompareError(f"eval.{key} is for eval.scorer: attributes (text and multi-condition arms on "
                                   "the shapes sets); this study uses the classifier")
        return
    if e.reader is None:
        raise CompareError("eval.scorer: attributes needs eval.reader, the attribute reader .safetensors "
                           "(deltafm attributes train)")
    if e.classifier is not None or e.images is not None:
        raise CompareError("eval.classifier and eval.images are for eval.scorer: classifier")
    bad = [s for s in e.prompt_splits if s not in PROMPT_SPLITS]
    if bad or not e.prompt_splits or len(set(e.prompt_splits)) != len(e.prompt_splits):
        raise CompareError(f"eval.prompt_splits must be distinct splits of {', '.join(PROMPT_SPLITS)}, got "
                           f"{e.prompt_splits}")


def validate(c: CompareConfig) -> None:
    """Check the relations between values (names, budget, baselines, stages, solvers); CompareError."""
    _check_name(c.name, "name")
    if c.total_images < 1 or c.eval_every_images < 1 or c.total_images % c.eval_every_images:
        raise CompareError(f"total_images ({c.total_images}) must be a positive multiple of eval_every_images "
                           f"({c.eval_every_images})")
    if not c.seeds or len(set(c.seeds)) != len(c.seeds) or any(s < 0 for s in c.seeds):
        raise CompareError(f"seeds must be distinct non-negative integers, got {c.seeds}")
    _validate_arms(c)
    _validate_eval(c.eval)
    if c.eval.scorer == "attributes":
        _validate_attribute_stages(c)


def _validate_attribute_stages(c: CompareConfig) -> None:
    """No ``along`` stage (it scores class labels with the classifier); ``reference_max`` covers every sample
    count (FD of N samples against at least N real images of the split)."""
    used = {s for a, v in c.variants() for s in (v.stages if v.stages is not None else a.stages)}
    for a in c.arms:
        if "along" in a.stages:
            raise CompareError(f"arm {a.name}: the along stage scores class labels with the classifier; with "
                               "eval.scorer: attributes give the arm stages without it (e.g. stages: [curve, cfg])")
    e = c.eval
    nums = {"curve": e.curve.num, "sweep": e.sweep.num, "cfg": e.cfg.num}
    most = max((n for s, n in nums.items() if s in used), default=0)
    if e.reference_max is not None and e.reference_max < most:
        raise CompareError(f"eval.reference_max ({e.reference_max}) must be >= the largest sample count of the "
                           f"stages in use ({most}): FD compares N samples with at least N real images")


# ----------------------------------------------------------------------------------------------------
# The base training config
# ----------------------------------------------------------------------------------------------------


def base_path(c: CompareConfig) -> Path:
    """The base training config: a path (relative to the study file) or a preset name."""
    from deltafm.train.config import find_preset

    p = Path(c.base)
    if not p.is_absolute() and c.source is not None:
        cand = Path(c.source).parent / p
        if cand.is_file():
            return cand
    if p.is_file():
        return p
    try:
        return find_preset(c.base)
    except ConfigError as e:
        where = f"relative to {Path(c.source).parent} or " if c.source is not None else ""
        raise CompareError(f"base {c.base!r} is neither a config file ({where}relative to the working folder) "
                           f"nor a preset: {e}") from None


def apply_study_overrides(c: CompareConfig) -> dict[str, Any]:
    """The base training config with the study-wide overrides, as a dict."""
    from deltafm.train.config import apply_overrides

    data = read_yaml(base_path(c), error=CompareError, what="base config")
    return apply_overrides(data, list(c.overrides.items()))
