"""Running a study: train each (arm, seed), evaluate its missing units from the kept checkpoints, store
every unit as soon as it is done, and collect everything into ``results.json``.

Files (all JSON written atomically, so two processes may share one output folder if they run disjoint
arms or seeds): ``results/<arm>/seed<k>.json`` per (arm, seed) (with ``provenance``, the distinct
environments (:func:`deltafm.provenance.environment`: commit, versions, machine) that trained and evaluated
it; each unit's ``env`` and the training's ``train.env`` index that list), ``classifier/classifier.json`` (the
classifier and reference statistics in use), ``results.json`` (format :data:`FORMAT`), ``compare.log``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from deltafm.atomic import atomic_write
from deltafm.study.evaluator import Evaluator
from deltafm.study.plan import check_scoring, eval_points, plan_units, resolve_train_config
from deltafm.study.spec import ArmSpec, CompareConfig, CompareError

__all__ = ["FORMAT", "Log", "make_evaluator", "run_arm_seed", "run_compare", "collect_results", "read_json",
           "write_json"]

FORMAT = "deltafm.compare.v1"
#: Training-config keys that may change between invocations without invalidating results.
_IGNORED_KEYS = ("train.threads", "train.device", "train.ckpt_every", "train.keep_last", "train.total_images",
                 "train.steps", "log.", "sample.")


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON through a temporary file and a rename (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=1, sort_keys=False) + "\n"
    # a unique temporary name: two compare processes may share OUT
    atomic_write(path, lambda tmp: tmp.write_text(text), tmp=path.with_name(f"{path.name}.{os.getpid()}.tmp"))


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when there is no such file."""
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """A training config as flat dotted keys, without the keys that may change between invocations."""
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


class Log:
    """Timestamped lines to stdout (unless quiet) and appended to a file."""

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
# One (arm, seed)
# ----------------------------------------------------------------------------------------------------


def _ckpt_at(run_dir: Path, step: int) -> Path | None:
    from deltafm.train.checkpoint import step_dir_name

    p = run_dir / "checkpoints" / step_dir_name(step)
    return p if (p / "COMPLETE").is_file() else None


def _train_to(c: CompareConfig, arm: ArmSpec, seed: int, images: int, run_dir: Path, rec: dict[str, Any],
              log: Log) -> None:
    import torch

    from deltafm.train.loop import train

    cfg = resolve_train_config(c, arm, seed, images)
    t0 = time.perf_counter()
    rec["train"]["env"] = _note_env(rec)
    log(f"train {arm.name} seed {seed} up to {images} images ({images // cfg.train.batch_size} steps)")
    with torch.random.fork_rng(devices=[]):
        res = train(cfg, run_dir, resume="auto")
    rec["train"]["seconds"] = round(rec["train"].get("seconds", 0.0) + time.perf_counter() - t0, 1)
    if res.status != "done":
        raise KeyboardInterrupt(f"training of {arm.name} seed {seed} was interrupted at step {res.step}")


def _open_record(c: CompareConfig, arm: ArmSpec, seed: int, res_path: Path, run_dir: Path):
    """The (arm, seed) record (new or read back) and its training config; an error when the stored
    results were made with another training config."""
    from deltafm.train.config import config_to_dict

    full_cfg = resolve_train_config(c, arm, seed)
    cfg_dict = config_to_dict(full_cfg)
    rec = read_json(res_path) or {"arm": arm.name, "seed": seed, "status": "partial", "units": {},
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
    return rec, full_cfg


def _note_env(rec: dict[str, Any]) -> int:
    """The index of this process's environment in the record's ``provenance`` list (appended when new)."""
    from deltafm.provenance import environment

    envs = rec.setdefault("provenance", [])
    env = environment()
    if env not in envs:
        envs.append(env)
    return envs.index(env)


def _todo(c: CompareConfig, arm: ArmSpec, done: dict[str, Any], extractor_id: str) -> dict[str, dict[str, Any]]:
    """The units not done yet, or done with other settings."""
    units = plan_units(c, arm, extractor_id)
    return {k: u for k, u in units.items() if k not in done or done[k].get("settings") != u}


def _summary(u: dict[str, Any], metrics: dict[str, Any]) -> str:
    if u["stage"] == "along":
        return "traj acc " + " ".join(f"{a:.2f}" for a in metrics["trajectory"]["acc"][::5])
    for key, label in (("prompt_acc", "prompt acc"), ("all_acc", "all acc")):
        if key in metrics:
            return f"fd {metrics['fd']:.2f} {label} {metrics[key]:.3f}"
    return f"fd {metrics['fd']:.2f} acc {metrics['class_acc']:.3f}"


def _evaluate_checkpoint(ev: Evaluator, ckpt: Path, units: dict[str, dict[str, Any]], grid_dir: Path | None,
                         grid_name: str, save: Callable[[str, dict[str, Any]], None], log: Log, label: str) -> None:
    """Compute ``units`` (key -> settings) from one checkpoint, curve units first; ``save`` stores each.
    Curve units write their sample grid to ``grid_dir/<variant>/<grid_name>`` when ``grid_dir`` is set."""
    from deltafm.train.restore import load_for_sampling

    lm = load_for_sampling(ckpt, ema=True, device=ev.device)
    for key in sorted(units, key=lambda k: (units[k]["stage"] != "curve", k)):
        u = units[key]
        t0 = time.perf_counter()
        if u["stage"] == "along":
            metrics = ev.along_unit(lm, u)
        else:
            grid = grid_dir / u["variant"] / grid_name if grid_dir is not None and u["stage"] == "curve" else None
            if grid is not None and u.get("split") is not None:
                grid = grid.parent / u["split"] / grid_name
            metrics = ev.sample_unit(lm, u, grid_to=grid)
        save(key, {"settings": u, "step": lm.step, "images": lm.images_seen, "metrics": metrics})
        log(f"  {label} {key}: {_summary(u, metrics)} ({time.perf_counter() - t0:.0f}s)")


def run_arm_seed(c: CompareConfig, arm: ArmSpec, seed: int, out: Path, ev: Evaluator | None,
                 get_ev: Callable[[], Evaluator], log: Log, train_only: bool = False) -> dict[str, Any]:
    """Train (or continue) one arm for one seed and compute its missing units; returns its record.

    ``train_only``: only make sure the run is trained to the end (checkpoints at every evaluation point
    are kept), without loading the classifier or evaluating anything.
    """
    res_path = out / "results" / arm.name / f"seed{seed}.json"
    run_dir = out / "runs" / arm.name / f"seed{seed}"
    rec, full_cfg = _open_record(c, arm, seed, res_path, run_dir)
    batch = full_cfg.train.batch_size
    if train_only:
        final = _ckpt_at(run_dir, c.total_images // batch)
        if final is None:
            _train_to(c, arm, seed, c.total_images, run_dir, rec, log)
            write_json(res_path, rec)
        else:
            log(f"skip training {arm.name} seed {seed}: {final} exists")
        return rec
    done = rec["units"]
    extractor_id = ev.extractor_id if ev is not None else _cached_extractor_id(out, c)
    if extractor_id and not _todo(c, arm, done, extractor_id):
        if rec.get("status") != "done":
            rec["status"] = "done"
            write_json(res_path, rec)
        log(f"skip {arm.name} seed {seed}: all {len(plan_units(c, arm))} units done")
        return rec
    if full_cfg.conditioning.kind == "text" and _ckpt_at(run_dir, c.total_images // batch) is None:
        # one training process to the end (every evaluation checkpoint is kept): each start encodes the captions
        _train_to(c, arm, seed, c.total_images, run_dir, rec, log)
        write_json(res_path, rec)
    ev = ev or get_ev()
    todo = _todo(c, arm, done, ev.extractor_id)
    by_images: dict[int, list[str]] = {}
    for k, u in todo.items():
        by_images.setdefault(u["images"], []).append(k)

    env = _note_env(rec)

    def save(key: str, unit: dict[str, Any]) -> None:
        done[key] = {**unit, "env": env}
        write_json(res_path, rec)

    for images in eval_points(c):
        step, keys = images // batch, by_images.get(images, [])
        ckpt = _ckpt_at(run_dir, step)
        if ckpt is None and (keys or images == c.total_images):
            _train_to(c, arm, seed, images, run_dir, rec, log)
            write_json(res_path, rec)
            ckpt = _ckpt_at(run_dir, step)
            if ckpt is None:
                raise CompareError(f"training did not leave a checkpoint at step {step} in {run_dir}")
        if keys:
            grids = out / "samples" if images == c.total_images else None
            _evaluate_checkpoint(ev, ckpt, {k: todo[k] for k in keys}, grids, f"seed{seed}.png", save, log,
                                 f"{arm.name} s{seed}")
    rec["status"] = "done"
    write_json(res_path, rec)
    return rec


def _cached_extractor_id(out: Path, c: CompareConfig) -> str | None:
    """The classifier (or attribute reader) id recorded by an earlier invocation (to skip finished arms without
    loading it)."""
    info = read_json(out / "classifier" / "classifier.json")
    if info is None:
        return None
    if c.eval.scorer == "attributes":
        want, prefix = str(c.eval.reader), "attributes"
    else:
        want = c.eval.classifier or str(out / "classifier" / f"{info.get('dataset_name', '')}-classifier.safetensors")
        prefix = "classifier"
    if info.get("path") != want:
        return None
    from deltafm.eval.classifier import file_sha256

    if not Path(want).is_file() or f"{prefix}:{file_sha256(want)}" != info.get("id"):
        return None
    return info.get("id")


def make_evaluator(c: CompareConfig, out: Path, device: str, log: Log) -> Any:
    """The evaluator of the study's scorer: :class:`Evaluator` (classifier) or
    :class:`~deltafm.study.attributes.AttributeEvaluator`."""
    if c.eval.scorer == "attributes":
        from deltafm.study.attributes import AttributeEvaluator

        return AttributeEvaluator(c, out, device, log)
    return Evaluator(c, out, device, log)


# ----------------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------------


def _arm_meta(c: CompareConfig, a: ArmSpec) -> dict[str, Any]:
    try:
        cfg = resolve_train_config(c, a, c.arm_seeds(a)[0])
        meta = {"batch_size": cfg.train.batch_size, "lam": cfg.objective.lam, "negatives": cfg.objective.negatives,
                "model": cfg.model.name}
        if cfg.conditioning.kind != "class":  # recorded only when not class ids (class results stay as they were)
            meta["conditioning"] = cfg.conditioning.kind
    except Exception:  # noqa: BLE001 - informational only
        meta = {}
    return {"name": a.name, "seeds": c.arm_seeds(a), "baseline": a.baseline or c.baseline, "stages": a.stages,
            "overrides": a.overrides, "variants": [dataclasses.asdict(v) for v in a.variants], **meta}


def _run_variants(rec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The units of one (arm, seed) record grouped by variant and stage, each stage sorted."""
    variants: dict[str, dict[str, Any]] = {}
    for _key, unit in sorted(rec["units"].items()):
        s, m = unit["settings"], unit["metrics"]
        v = variants.setdefault(s["variant"], {"curve": [], "sweep": [], "cfg": [], "along": None})
        row = {"images": unit["images"], "step": unit["step"], "solver": s.get("solver"), "nfe": s.get("nfe"),
               "w": s.get("w"), "num": s["num"]}
        if s["stage"] == "along":
            v["along"] = {k: m[k] for k in ("trajectory", "noised_class", "noised_null")}
        elif s.get("scorer") == "attributes":  # every metric, and the prompt split (and guided part)
            row.update({k: s[k] for k in ("split", "part") if k in s})
            v[s["stage"]].append({**row, **m})
        else:
            v[s["stage"]].append({**row, **{k: m.get(k) for k in ("fd", "class_acc", "precision", "recall",
                                                                  "is", "seconds")},
                                  **{k: m[k] for k in ("kid", "per_seed") if k in m}})  # only when computed
    for v in variants.values():
        v["curve"].sort(key=lambda r: r["images"])
        v["sweep"].sort(key=lambda r: (r["solver"], r["nfe"]))
        v["cfg"].sort(key=lambda r: (r.get("part") or "", r["w"]))
    return variants


def collect_results(c: CompareConfig, out: Path, classifier_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Gather ``OUT/results/*/seed*.json`` into the ``results.json`` structure read by the report."""
    arms_meta = []
    runs = []
    for a in c.arms:
        arms_meta.append(_arm_meta(c, a))
        for seed in c.arm_seeds(a):
            rec = read_json(out / "results" / a.name / f"seed{seed}.json")
            if rec is None:
                continue
            run = {"arm": a.name, "seed": seed, "status": rec.get("status"), "train": rec.get("train", {}),
                   "variants": _run_variants(rec)}
            if rec.get("provenance"):  # records written before provenance existed have none
                run["provenance"] = rec["provenance"]
            runs.append(run)
    study = c.to_dict()
    study["arms"] = arms_meta
    results = {"format": FORMAT, "study": study, "classifier": classifier_info or read_json(
        out / "classifier" / "classifier.json"), "runs": runs}
    envs = [e for r in runs for e in r.get("provenance", [])]
    if envs:
        results["provenance"] = [e for i, e in enumerate(envs) if e not in envs[:i]]
    return results


def run_compare(c: CompareConfig, out: str | Path, *, arms: list[str] | None = None, device: str = "cpu",
                threads: int | None = None, classifier: str | None = None, report: bool = True,
                quiet: bool = False, train_only: bool = False) -> dict[str, Any]:
    """Run (or continue) the study into ``out``; returns the collected results (also in results.json).

    ``train_only`` trains the selected arms without evaluating (a later call evaluates their kept
    checkpoints)."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "compare.log", quiet=quiet)
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
    check_scoring(c)
    holder: dict[str, Evaluator] = {}

    def get_ev() -> Evaluator:
        if "ev" not in holder:
            ev = make_evaluator(c, out, device, log)
            write_json(out / "classifier" / "classifier.json", {**ev.info(), "dataset_name": ev.dataset})
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
    results = collect_results(c, out, holder["ev"].info() if "ev" in holder else None)
    write_json(out / "results.json", results)
    log(f"compare {c.name}: finished in {time.perf_counter() - t0:.0f}s; results in {out / 'results.json'}")
    if report:
        from deltafm.study.report import write_report

        log(f"report: {write_report(out / 'results.json', out / 'report')}")
    return results
