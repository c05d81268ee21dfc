"""``deltafm toy``: the 2-D study of FM vs ΔFM (also ``python -m deltafm.toy``).

    deltafm toy --preset paper-fig3 --out runs/toy            # one seed: figures, metrics.json, results.md
    deltafm toy --preset paper-fig3 --out runs/toy --seeds 0 1 2   # OUT/seed_S for each + summary.md/json
    deltafm toy --list-presets
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deltafm.errors import CLI_ERRORS, UserError, cli_error

__all__ = ["main", "build_parser"]


class ToyArgumentError(UserError, ValueError):
    """A ``deltafm toy`` argument cannot be used (the message names it)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deltafm toy",
        description="Train FM and ΔFM side by side on a class-conditional 2-D dataset and measure how the "
        "class flows separate (figures, metrics.json, results.md). See docs/TOY.md.",
    )
    p.add_argument("--preset", default="paper-fig3", help="study preset (default paper-fig3; see --list-presets)")
    p.add_argument("--out", type=Path, help="output folder")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    seeds.add_argument("--seeds", type=int, nargs="+", help="several seeds: OUT/seed_S each, plus summary.md")
    p.add_argument("--steps", type=int, default=None, help="training steps per run")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--eval-per-class", type=int, default=None, help="generated samples per class for the metrics")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (preset default 1: fastest for these tiny models on a busy machine)")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    return p


def _configs(args: argparse.Namespace) -> list:
    """The study configs of the seeds asked for, after checking every argument (nothing is written yet)."""
    from deltafm.toy.config import preset_config

    if args.out is None:
        raise ToyArgumentError("--out DIR is required")
    for p in (args.out, *args.out.parents):
        if p.exists() and not p.is_dir():
            raise ToyArgumentError(f"--out {args.out}: {p} is a file, not a folder")
    for name, val in (("--steps", args.steps), ("--batch-size", args.batch_size),
                      ("--eval-per-class", args.eval_per_class), ("--threads", args.threads)):
        if val is not None and val < 1:
            raise ToyArgumentError(f"{name} must be >= 1, got {val}")
    seeds = args.seeds if args.seeds else [args.seed if args.seed is not None else 0]
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ToyArgumentError(f"seeds must be distinct non-negative integers, got {seeds}")
    overrides = dict(steps=args.steps, batch_size=args.batch_size, eval_per_class=args.eval_per_class,
                     threads=args.threads)
    try:
        return [preset_config(args.preset, seed=s, **overrides) for s in seeds]
    except ValueError as e:  # preset_config's unknown preset / field
        raise ToyArgumentError(str(e)) from None


def _run(args: argparse.Namespace) -> int:
    from deltafm.toy.config import PRESETS
    from deltafm.toy.study import run_study
    from deltafm.toy.tables import aggregate, results_table, summary_table

    if args.list_presets:
        for name in PRESETS:
            cfg = PRESETS[name]()
            print(f"{name:14s} dataset={cfg.dataset} model={cfg.model} steps={cfg.steps} runs="
                  f"{[r.name for r in cfg.runs]}")
        return 0
    cfgs = _configs(args)
    results = []
    for cfg in cfgs:
        out = args.out if args.seeds is None else args.out / f"seed_{cfg.seed}"
        m = run_study(cfg, out, progress=not args.no_progress, figures=not args.no_figures)
        results.append(m)
        if args.seeds is None:
            print(results_table(m))
        print(f"seed {cfg.seed}: wrote {out}/metrics.json, results.md"
              + ("" if args.no_figures else ", " + ", ".join(m.get("figures", {}).values()))
              + f" ({m['timing']['total_s']:.0f} s)", file=sys.stderr)
    if args.seeds is not None:
        agg = aggregate(results)
        table = summary_table(agg)
        (args.out / "summary.json").write_text(json.dumps(agg, indent=1))
        seeds = [cfg.seed for cfg in cfgs]
        (args.out / "summary.md").write_text(f"# Toy study `{args.preset}` over seeds {seeds}\n\n" + table)
        print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the toy study; returns the exit status (2 and one ``error:`` line on bad arguments; other
    exceptions are bugs and show their traceback)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except CLI_ERRORS as e:
        print(cli_error(e), file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
