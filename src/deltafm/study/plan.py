"""What a study computes: the training config of each (arm, seed), the evaluation points, and the
evaluation **units** of an (arm, seed) with the settings that identify them (a unit is redone when its
settings change), plus a cost estimate in model forward passes."""

from __future__ import annotations

from typing import Any

from deltafm.data.shapes_config import FACTORS as _SHAPES_FACTORS
from deltafm.solvers import nfe_to_steps
from deltafm.study.spec import ArmSpec, CompareConfig, CompareError, VariantSpec, apply_study_overrides

__all__ = [
    "METRICS_VERSION",
    "resolve_train_config",
    "eval_points",
    "variant_stages",
    "plan_units",
    "forward_passes",
    "check_scoring",
]

#: Bumped when the computation of a unit's metrics changes (units with another version are redone).
METRICS_VERSION = 1


def resolve_train_config(c: CompareConfig, arm: ArmSpec, seed: int, images: int | None = None):
    """The training :class:`~deltafm.train.config.Config` of ``arm`` and ``seed``, trained up to ``images``.

    Base config, then the study's and the arm's overrides, then: ``train.seed = seed``,
    ``train.total_images = images`` (default: the study's total), checkpoints exactly at the evaluation
    points (``ckpt_every`` = one evaluation interval, all kept), no sample grids, no progress bar.
    """
    from deltafm.train.config import ConfigError, apply_overrides, config_from_dict

    data = apply_overrides(apply_study_overrides(c), list(arm.overrides.items()))
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


def variant_stages(arm: ArmSpec, v: VariantSpec) -> list[str]:
    """The stages a variant is evaluated in (its own, else its arm's)."""
    return list(v.stages if v.stages is not None else arm.stages)


def _sample_units(c: CompareConfig, v: VariantSpec, stages: list[str], common: dict[str, Any]) -> dict[str, dict]:
    """The curve, sweep and cfg units of one variant (each draws samples and scores them); with the attribute
    scorer, once per prompt split (key suffix ``/<split>``, setting ``split``), plus the per-part cfg units."""
    if c.eval.scorer != "attributes":
        return _split_units(c, v, stages, common)
    units: dict[str, dict[str, Any]] = {}
    e = c.eval
    for split in e.prompt_splits:
        per = _split_units(c, v, stages, {**common, "split": split})
        if "cfg" in stages:
            for part, ws in e.cfg.part_scales.items():
                for w in ws:
                    per[f"cfg/{v.name}/{part}={float(w):g}"] = dict(
                        stage="cfg", variant=v.name, images=c.total_images, solver=e.cfg.solver, nfe=e.cfg.nfe,
                        num=e.cfg.num, w=float(w), part=part, interval=list(e.cfg.interval), **common, split=split)
        units.update({f"{k}/{split}": u for k, u in per.items()})
    return units


def _split_units(c: CompareConfig, v: VariantSpec, stages: list[str], common: dict[str, Any]) -> dict[str, dict]:
    """The curve, sweep and (joint) cfg units of one variant with the settings ``common``."""
    e = c.eval
    units: dict[str, dict[str, Any]] = {}
    if "curve" in stages:
        for img in eval_points(c):
            units[f"curve/{v.name}/{img}"] = dict(stage="curve", variant=v.name, images=img, solver=e.curve.solver,
                                                  nfe=e.curve.nfe, num=e.curve.num, w=1.0, **common)
    if "sweep" in stages:
        for solver in e.sweep.solvers:
            for nfe in e.sweep.nfe:
                if nfe_to_steps(solver, nfe) is None:
                    continue
                units[f"sweep/{v.name}/{solver}/{nfe}"] = dict(
                    stage="sweep", variant=v.name, images=c.total_images, solver=solver, nfe=nfe,
                    num=e.sweep.num, w=1.0, **common)
    if "cfg" in stages:
        for w in e.cfg.scales:
            units[f"cfg/{v.name}/{float(w):g}"] = dict(
                stage="cfg", variant=v.name, images=c.total_images, solver=e.cfg.solver, nfe=e.cfg.nfe,
                num=e.cfg.num, w=float(w), interval=list(e.cfg.interval), **common)
    return units


def plan_units(c: CompareConfig, arm: ArmSpec, extractor_id: str = "") -> dict[str, dict[str, Any]]:
    """Every evaluation unit of one (arm, seed): key -> settings (a unit is redone when they change)."""
    e = c.eval
    common: dict[str, Any] = {"seed": e.sample_seed, "amp": e.amp, "extractor": extractor_id, "pr_k": e.pr_k,
                              "metrics_version": METRICS_VERSION}
    if e.sample_seeds is not None:  # recorded only when given, so units of studies without them stay valid
        del common["seed"]
        common["seeds"] = [int(s) for s in e.sample_seeds]
    if e.kid_subsets > 0:
        common.update(kid_subsets=e.kid_subsets, kid_subset_size=e.kid_subset_size)
    if e.scorer == "attributes":  # recorded only for this scorer, so classifier units stay what they were
        common.update(scorer="attributes", ref_items=e.reference_max)
    units: dict[str, dict[str, Any]] = {}
    for v in arm.variants:
        st = variant_stages(arm, v)
        vkey = {"map": v.map, "lam": v.lam}
        if v.correction != "always":  # recorded only when not the default, so older units stay valid
            vkey["correction"] = v.correction
        units.update(_sample_units(c, v, st, {**vkey, **common}))
        if "along" in st:
            units[f"along/{v.name}"] = dict(stage="along", variant=v.name, images=c.total_images,
                                            times=list(e.along.times), num=e.along.num,
                                            steps=e.along.trajectory_steps, split=e.reference_split,
                                            **vkey, **common)
    return units


def forward_passes(units: dict[str, dict[str, Any]]) -> int:
    """Model forward passes per image summed over units (a cost estimate)."""
    total = 0
    for u in units.values():
        if u["stage"] == "along":
            total += u["num"] * (2 * len(u["times"]) + u["steps"])
        else:
            total += u["num"] * u["nfe"] * (2 if u["w"] != 1.0 else 1) * len(u.get("seeds") or [0])
    return total


def check_scoring(c: CompareConfig) -> None:
    """Every arm fits the scorer: class-conditional arms for the classifier; text or multi-condition arms on the
    shapes sets for the attribute reader, all of one kind, with ``cfg.part_scales`` naming parts of multi arms.
    A :class:`CompareError` naming the arm otherwise."""
    kinds = {}
    for a in c.arms:
        cfg = resolve_train_config(c, a, c.arm_seeds(a)[0])
        kind, data = cfg.conditioning.kind, cfg.data.name
        if c.eval.scorer == "classifier":
            if kind != "class":
                raise CompareError(f"arm {a.name}: conditioning.kind={kind} samples are scored against their "
                                   f"{'prompts' if kind == 'text' else 'conditions'}: set eval.scorer: attributes "
                                   "and eval.reader (the classifier scores class-conditional arms only)")
            continue
        if kind == "class":
            raise CompareError(f"arm {a.name}: eval.scorer attributes scores text or multi-condition arms "
                               "(conditioning.kind text|multi); this arm is class-conditional (use eval.scorer: "
                               "classifier)")
        if data not in ("shapes", "shapes-scenes"):
            raise CompareError(f"arm {a.name}: the attribute reader reads the shapes sets (data.name shapes or "
                               f"shapes-scenes), not {data!r}")
        kinds[a.name] = kind
        parts = set(cfg.conditioning.parts or _SHAPES_FACTORS)
        unknown = sorted(set(c.eval.cfg.part_scales) - parts) if kind == "multi" else []
        if c.eval.cfg.part_scales and (kind != "multi" or unknown):
            what = f"parts {unknown} it is not conditioned on" if unknown else "a text, not named parts"
            raise CompareError(f"eval.cfg.part_scales guides parts of multi-condition arms; arm {a.name} has {what}")
    if len(set(kinds.values())) > 1:
        raise CompareError(f"the arms of an attributes study must share one conditioning kind, got {kinds}")
