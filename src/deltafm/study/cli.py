"""``deltafm compare`` (also ``python -m deltafm.study``): run a study, print its plan, or write its report.

    deltafm compare --config configs/compare/fmnist-unet.yaml --out runs/compare/fmnist-unet [--seeds 0 1 2]
    deltafm compare --config ... --out ... [--arms fm dfm-0.05] [--dry-run] [--report-only] [--train-only]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deltafm.errors import CLI_ERRORS, UserError, cli_error
from deltafm.study.plan import (
    check_scoring,
    eval_points,
    forward_passes,
    plan_units,
    resolve_train_config,
    variant_stages,
)
from deltafm.study.spec import CompareConfig, CompareError, apply_study_overrides, base_path, load_compare_config
from deltafm.study.spec import validate as validate_study

__all__ = ["build_parser", "describe_plan", "main"]

#: Keys whose differences between an arm and the base are the study's doing, not the arm's.
_PLAN_IGNORED = ("train.seed", "train.ckpt_every", "train.keep_last", "sample.", "log.", "train.total_images",
                 "train.steps")


def describe_plan(c: CompareConfig, seeds: list[int]) -> str:
    """The ``--dry-run`` text: per arm its seeds, batch, steps, what differs from the base, its variants and
    evaluation units; totals of training images and sampling forward passes."""
    from deltafm.train.config import config_from_dict, diff_configs

    lines = [f"study {c.name}: base {base_path(c)}, seeds {seeds}, {c.total_images} images per run, "
             f"evaluated at {eval_points(c)}", f"baseline variant: {c.baseline}", ""]
    base = config_from_dict(apply_study_overrides(c))
    tot_train = tot_sample = 0
    for a in c.arms:
        s = c.arm_seeds(a)
        cfg = resolve_train_config(c, a, s[0])
        diff = [(k, x, y) for k, x, y in diff_configs(base, cfg) if not k.startswith(_PLAN_IGNORED)]
        units = plan_units(c, a)
        fw = forward_passes(units)
        tot_train += c.total_images * len(s)
        tot_sample += fw * len(s)
        lines.append(f"arm {a.name}: seeds {s}; batch {cfg.train.batch_size}, {c.total_images // cfg.train.batch_size}"
                     f" steps; differs from base in " + (", ".join(f"{k}={y!r}" for k, _, y in diff) or "nothing"))
        for v in a.variants:
            lines.append(f"    variant {v.name}: map {v.map}" + (f" (lam {v.lam})" if v.lam else "")
                         + f", stages {variant_stages(a, v)}")
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
    p.add_argument("--train-device", help="train every arm on this device (cpu, cuda[:N], auto; default: the "
                                          "training configs' train.device); not part of what makes results "
                                          "comparable, like train.threads")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the per-arm configs, then exit")
    p.add_argument("--report-only", action="store_true", help="collect existing results and write the report")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--train-only", action="store_true",
                   help="only train the arms (all evaluation checkpoints are kept); evaluate with a later call")
    p.add_argument("--quiet", action="store_true")
    return p


def _check_args(args: argparse.Namespace, c: CompareConfig, out: Path) -> None:
    """Refuse bad arguments before anything is written: unknown arms, a missing classifier file, a missing or
    mismatched attribute reader, threads < 1, an output path that is a file, nothing to report, an arm whose
    config or plan does not resolve or does not fit the scorer."""
    if args.arms:
        unknown = sorted(set(args.arms) - {a.name for a in c.arms})
        if unknown:
            raise CompareError(f"unknown arm(s) {unknown}; the study's arms: {[a.name for a in c.arms]}")
    if args.threads is not None and args.threads < 1:
        raise CompareError(f"--threads must be >= 1, got {args.threads}")
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise CompareError(f"--out {out}: {p} is a file, not a folder")
    if c.eval.scorer == "attributes" and args.classifier is not None:
        raise CompareError("--classifier: this study scores with the attribute reader (eval.reader)")
    if c.eval.scorer == "attributes" and not (args.train_only or args.dry_run or args.report_only):
        if not Path(str(c.eval.reader)).is_file():
            raise CompareError(f"eval.reader {c.eval.reader}: no such file (train one with deltafm attributes train)")
        from deltafm.study.attributes import load_checked_reader

        load_checked_reader(c)  # before any training: a reader for other images stops here
    classifier = args.classifier or c.eval.classifier
    if classifier is not None and not args.train_only and not Path(classifier).is_file():
        where = "--classifier" if args.classifier else "eval.classifier"
        raise CompareError(f"{where} {classifier}: no such file (omit it to train a classifier into OUT/classifier)")
    if args.report_only and not any(any((out / "results" / a.name).glob("seed*.json")) for a in c.arms):
        raise CompareError(f"--report-only: {out / 'results'} holds no results of this study; run it first")
    for a in c.arms:  # every arm's training config and evaluation plan resolve (unknown keys, bad values)
        if args.arms is None or a.name in args.arms:
            resolve_train_config(c, a, c.arm_seeds(a)[0])
            plan_units(c, a)
    check_scoring(c)  # every arm fits the scorer (class arms: classifier; text/multi arms: attribute reader)


def _run(args: argparse.Namespace) -> int:
    from deltafm.eval.cli import resolve_device
    from deltafm.study.run import collect_results, run_compare, write_json

    c = load_compare_config(args.config)
    if args.train_device is not None:
        try:  # a bad or missing device is an error before anything runs
            resolve_device(args.train_device)
        except CompareError:
            raise
        except UserError as e:
            raise CompareError(str(e).replace("--device", "--train-device")) from None
        c.overrides = {**c.overrides, "train.device": args.train_device}
    if args.seeds:
        c.seeds = list(args.seeds)
        validate_study(c)
    out = args.out or Path("runs") / "compare" / c.name
    _check_args(args, c, out)
    if args.dry_run:
        print(describe_plan(c, c.seeds))
        return 0
    device = resolve_device(args.device)
    if args.report_only:
        from deltafm.study.report import write_report

        write_json(out / "results.json", collect_results(c, out))
        print(write_report(out / "results.json", out / "report"))
        return 0
    run_compare(c, out, arms=args.arms, device=device, threads=args.threads, classifier=args.classifier,
                report=not (args.no_report or args.train_only), quiet=args.quiet, train_only=args.train_only)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``deltafm compare``; 0 on success, 2 on bad input (one ``error:`` line), 1 when
    interrupted. Other exceptions (bugs) propagate with their traceback."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except CLI_ERRORS as e:
        print(cli_error(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}; run the same command again to continue", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
