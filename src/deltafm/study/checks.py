"""Metric-validity checks on a finished study (issue 13): how FD and KID depend on the sample count, whether a
second, independently trained feature network agrees, and whether a plain pixel-space contrast stretch of FM
samples buys the same FD gain as ΔFM.

    python -m deltafm.study.checks --config configs/compare/fmnist-unet-power.yaml --out runs/compare/NAME \\
        --variants fm fm+posthoc dfm dfm+bc --seeds 0 1 2 --num 4000 --sizes 250 500 1000 2000 4000 \\
        --second-classifier runs/eval/fmnist-classifier-wide.safetensors --stretch 0.9 0.95 1.05 1.1 1.2 \\
        --json docs/figures/compare/NAME-checks.json --figures docs/figures/compare \\
        --link-prefix figures/compare --update docs/RESULTS.md

It reads the final checkpoint (EMA weights) of each (arm, seed) the study kept under ``OUT/runs`` and, per
variant and seed, draws ``--num`` samples once with the study's curve sampler (``eval.curve``: solver, NFE;
noise seed ``eval.sample_seed``, precision ``eval.amp``), then:

* **sample size**: FD and KID of the first n samples for each n in ``--sizes``, against the study's reference
  statistics, and the *real-data floor*: the same metrics for n real images of the training split (never
  in the reference split), i.e. what a perfect generator would score with n samples. The samples are
  class-balanced (label i mod K, :func:`deltafm.generate.labels_for`), and so is the floor that matches them:
  n training images with the same labels in the same order (*balanced floor*). A balanced set has fewer
  same-class pairs than an i.i.d. one (a pair shares its class with probability (n/K − 1)/(n − 1) instead
  of 1/K), so both metrics read lower on it: KID, unbiased for i.i.d. sets, is biased low by O(1/n), and
  FD's few-sample bias is smaller (``scripts/balanced_sets_bias.py``, table in docs/EVAL.md). The i.i.d.
  floor (n training images drawn at random) is kept beside it.
* **second feature network**: FD, KID and class accuracy of all ``--num`` samples in the features of
  ``--second-classifier`` (another classifier trained on the training split: other widths and seed,
  ``deltafm eval train-classifier --widths 48 96 192 --seed 1``), beside the study's own classifier; paired
  differences variant − baseline per network with 95% t-intervals over seeds.
* **contrast stretch** (for the variants in ``--stretch-variants``, default the study's baseline): each
  sample's pixels x ∈ [0, 255] mapped to clip(m + a (x − m)) with m the image's own mean, for each a in
  ``--stretch``; FD/KID after the map, and the pixel-intensity histograms of the raw variants and of the real
  reference images (a figure). If some a brings FM's FD down as far as ΔFM's, a pixel transform explains the
  gain as well as the learned model does.

The JSON records the settings, every value per seed, the paired summaries and :func:`deltafm.provenance`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deltafm.errors import CLI_ERRORS, OneLineParser, cli_error
from deltafm.study.spec import CompareError, load_compare_config

__all__ = ["build_parser", "checks_markdown", "contrast_stretch", "main", "pixel_histogram", "run_checks"]

FORMAT = "deltafm.checks.v1"


def contrast_stretch(images: np.ndarray, a: float) -> np.ndarray:
    """uint8 images (N, ...) with each image's pixels mapped to clip(m + a (x − m), 0, 255), m its own mean,
    rounded to the nearest integer (a = 1 returns the images unchanged)."""
    x = images.astype(np.float64)
    m = x.reshape(len(x), -1).mean(axis=1).reshape((-1,) + (1,) * (x.ndim - 1))
    return np.clip(np.rint(m + a * (x - m)), 0, 255).astype(np.uint8)


def pixel_histogram(images: np.ndarray, bins: int = 32) -> list[float]:
    """The fraction of pixel values (all channels) in each of ``bins`` equal bins of [0, 256)."""
    h, _ = np.histogram(images, bins=bins, range=(0, 256))
    return (h / max(h.sum(), 1)).tolist()


def _metrics(extractor: Any, images: np.ndarray, ref: Any, labels: np.ndarray | None, batch_size: int,
             kid_subsets: int, kid_subset_size: int) -> dict[str, float]:
    from deltafm.eval.features import evaluate_samples
    from deltafm.study.evaluator import SCORING

    r = evaluate_samples(extractor, images, ref, labels=labels, layout="NHWC", k=3, batch_size=batch_size,
                         progress=False, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, **SCORING)
    out = {"fd": float(r["fd"]), "kid": float(r["kid"])}
    if "class_accuracy" in r:
        out["class_acc"] = float(r["class_accuracy"]["overall"])
    return out


def _final_checkpoint(out: Path, arm: str, seed: int) -> Path:
    from deltafm.train.checkpoint import list_checkpoints

    folder = out / "runs" / arm / f"seed{seed}" / "checkpoints"
    ckpts = list_checkpoints(folder) if folder.is_dir() else []
    if not ckpts:
        raise CompareError(f"no checkpoint of arm {arm} seed {seed} under {folder}; run the study first")
    return ckpts[-1]


def balanced_order(labels: np.ndarray, num: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``num`` distinct items whose labels run 0, 1, …, K−1, 0, 1, … (the order of
    :func:`deltafm.generate.labels_for`), each class's items drawn at random without replacement, so every
    prefix of length n is class-balanced exactly as n generated samples are."""
    labels = np.asarray(labels)
    per = -(-num // num_classes)
    pools = []
    for k in range(num_classes):
        have = np.flatnonzero(labels == k)
        if len(have) < per:
            raise CompareError(f"class {k} has {len(have)} training images, fewer than the {per} a balanced "
                               f"floor of {num} needs")
        pools.append(rng.choice(have, per, replace=False))
    return np.array([pools[i % num_classes][i // num_classes] for i in range(num)], dtype=np.int64)


def floors(ev: Any, batch_size: int, sizes: list[int], seed: int, kid: dict[str, int]) -> dict[str, Any]:
    """The real-data floors at every n of ``sizes``: ``floor`` (n training images drawn at random, seed
    ``seed``) and ``floor_balanced`` (n training images labelled like n generated samples,
    :func:`balanced_order`, seed (``seed``, 1)), each {"fd": [...], "kid": [...]} against the study's
    reference statistics."""
    split = ev.split("train")
    train_imgs, train_labels = split.images, np.asarray(split.labels)
    if len(train_imgs) < sizes[-1]:
        raise CompareError(f"the training split has {len(train_imgs)} images, fewer than the largest size")
    g = np.random.default_rng(seed)
    at_random = np.sort(g.choice(len(train_imgs), sizes[-1], replace=False))
    balanced = balanced_order(train_labels, sizes[-1], split.num_classes, np.random.default_rng([seed, 1]))
    out: dict[str, Any] = {}
    for key, idx in (("floor", at_random), ("floor_balanced", balanced)):
        real = train_imgs[idx].numpy().transpose(0, 2, 3, 1)
        out[key] = {"fd": [], "kid": []}
        for n in sizes:
            m = _metrics(ev.classifier, real[:n], ev.ref, None, batch_size, **kid)
            out[key]["fd"].append(m["fd"])
            out[key]["kid"].append(m["kid"])
    return out


def _draw(c: Any, ev: Any, out: Path, arm: Any, name: str, seed: int, num: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC samples, their labels): ``num`` class-balanced samples of variant ``name`` from the final EMA
    checkpoint of (``arm``, ``seed``) with the study's curve sampler and noise seed."""
    import torch

    from deltafm.generate import generate, labels_for
    from deltafm.solvers import nfe_to_steps
    from deltafm.study.evaluator import Evaluator
    from deltafm.train.restore import load_for_sampling

    v = next(v for v in arm.variants if v.name == name)
    lm = load_for_sampling(_final_checkpoint(out, arm.name, seed), ema=True)
    k = lm.data.num_classes
    labels = labels_for(num, k)
    with torch.no_grad():
        x = generate(lm.model, labels=labels, shape=lm.shape, num_classes=k, solver=c.eval.curve.solver,
                     steps=nfe_to_steps(c.eval.curve.solver, c.eval.curve.nfe), cfg=1.0,
                     correction=Evaluator.correction(lm, {"map": v.map, "lam": v.lam}),
                     seed=c.eval.sample_seed, batch_size=c.eval.batch_size, path=lm.objective.path,
                     amp_dtype=torch.bfloat16 if c.eval.amp == "bf16" else None)
    imgs = ev._decoder(lm)(x)
    return (imgs.numpy() if hasattr(imgs, "numpy") else np.asarray(imgs)), labels.numpy()


def _paired(values: dict[str, dict[int, float]], a: str, b: str) -> dict[str, Any]:
    from deltafm.study.paired import mean_ci

    seeds = sorted(set(values.get(a, {})) & set(values.get(b, {})))
    d = [values[a][s] - values[b][s] for s in seeds]
    mean, low, high = mean_ci(d) if d else (None, None, None)
    return {"variant": a, "baseline": b, "n": len(d), "diffs": d, "mean": mean,
            "ci95": [low, high] if low is not None else None}


def run_checks(args: argparse.Namespace, log=print) -> dict[str, Any]:
    """Everything of the module docstring; returns the JSON-ready result."""
    from deltafm.eval.classifier import load_classifier
    from deltafm.eval.features import reference_statistics
    from deltafm.provenance import environment
    from deltafm.study.evaluator import Evaluator

    c = load_compare_config(args.config)
    if c.eval.scorer != "classifier":
        raise CompareError("the checks score class-conditional studies with the feature classifier")
    out = Path(args.out)
    sizes = sorted(set(args.sizes))
    if sizes[-1] > args.num or sizes[0] < 2:
        raise CompareError(f"--sizes must lie in 2..--num ({args.num}), got {sizes}")
    ev = Evaluator(c, out, "cpu", lambda m: log(m), classifier=args.classifier)
    variants = args.variants or [v.name for _, v in c.variants()]
    stretch_variants = args.stretch_variants or [c.baseline]
    nets: dict[str, tuple[Any, Any]] = {"study": (ev.classifier, ev.ref)}
    if args.second_classifier:
        second = load_classifier(args.second_classifier).eval()
        nets["second"] = (second, reference_statistics(second, ev.reference_images(), progress=False))
    kid = dict(kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size)
    result: dict[str, Any] = {
        "format": FORMAT, "study": c.name, "config": str(args.config), "out": str(out), "num": args.num,
        "sizes": sizes, "seeds": args.seeds, "variants": variants, "sampler": {
            "solver": c.eval.curve.solver, "nfe": c.eval.curve.nfe, "noise_seed": c.eval.sample_seed},
        "kid": kid, "floor_seed": args.seed, "classifier": ev.extractor_id, "provenance": environment(),
        **floors(ev, c.eval.batch_size, sizes, args.seed, kid), "sample_size": {},
        "networks": {n: {} for n in nets}, "stretch": {},
        "histograms": {"real": pixel_histogram(ev.split(c.eval.reference_split).images.numpy())}}
    if "second" in nets:
        result["second_classifier"] = nets["second"][0].extractor_id
    log("real-data floor FD " + ", ".join(f"{v:.2f}" for v in result["floor_balanced"]["fd"]) + " (balanced), "
        + ", ".join(f"{v:.2f}" for v in result["floor"]["fd"]) + f" (at random) at n = {sizes}")
    arms = {v.name: a for a, v in c.variants()}
    unknown = sorted(set(variants) - set(arms))
    if unknown:
        raise CompareError(f"unknown variant {unknown[0]!r}; the study has {sorted(arms)}")
    for seed in args.seeds:
        for name in variants:
            t0 = time.perf_counter()
            imgs, lab = _draw(c, ev, out, arms[name], name, seed, args.num)
            ss = result["sample_size"].setdefault(name, {}).setdefault(str(seed), {"fd": [], "kid": []})
            for n in sizes:
                m = _metrics(ev.classifier, imgs[:n], ev.ref, lab[:n], c.eval.batch_size, **kid)
                ss["fd"].append(m["fd"])
                ss["kid"].append(m["kid"])
            for net, (extractor, ref) in nets.items():
                result["networks"][net].setdefault(name, {})[str(seed)] = _metrics(
                    extractor, imgs, ref, lab, c.eval.batch_size, **kid)
            result["histograms"].setdefault(name, pixel_histogram(imgs))
            if name in stretch_variants:
                st = result["stretch"].setdefault(name, {})
                for a in args.stretch:
                    st.setdefault(f"{a:g}", {})[str(seed)] = _metrics(
                        ev.classifier, contrast_stretch(imgs, a), ev.ref, lab, c.eval.batch_size, **kid)
            log(f"{name} seed {seed}: FD {ss['fd'][-1]:.3f} at n={sizes[-1]} ({time.perf_counter() - t0:.0f}s)")
    result["paired"] = _summaries(result, c, variants)
    return result


def _summaries(result: dict[str, Any], c: Any, variants: list[str]) -> dict[str, Any]:
    """Paired differences of every variant against the study's baseline (and the study's comparisons) per
    network and metric, and the best contrast stretch against ΔFM."""
    pairs = [[v, c.baseline] for v in variants if v != c.baseline]
    pairs += [list(p) for p in c.comparisons if all(x in variants for x in p) and list(p) not in pairs]
    out: dict[str, Any] = {}
    for net, per in result["networks"].items():
        for metric in ("fd", "kid", "class_acc"):
            vals = {v: {int(s): m[metric] for s, m in per[v].items() if metric in m} for v in per}
            out[f"{net}.{metric}"] = [_paired(vals, a, b) for a, b in pairs]
    for name, per_a in result["stretch"].items():
        vals = {f"{name}@{a}": {int(s): m["fd"] for s, m in seeds.items()} for a, seeds in per_a.items()}
        base = {int(s): m["fd"] for s, m in result["networks"]["study"][name].items()}
        out[f"stretch.{name}"] = [_paired({**vals, name: base}, k, name) for k in vals]
    return out


def add_floors(args: argparse.Namespace, result: dict[str, Any], log=print) -> dict[str, Any]:
    """``result`` (an earlier run's JSON) with both real-data floors computed again (:func:`floors`, its sizes,
    KID settings and ``args.seed``) and the environment they were computed in under ``floors_provenance``.
    The at-random floor must come out as stored (the same draw; the JSON's ``floor_seed`` where it has one):
    a difference larger than float noise means another seed or data, and is an error, not an overwrite."""
    from deltafm.provenance import environment
    from deltafm.study.evaluator import Evaluator

    c = load_compare_config(args.config)
    if c.name != result["study"]:
        raise CompareError(f"--config is study {c.name!r}, the JSON holds {result['study']!r}")
    ev = Evaluator(c, Path(args.out), "cpu", lambda m: log(m), classifier=args.classifier)
    if ev.extractor_id != result["classifier"]:
        raise CompareError(f"the classifier is {ev.extractor_id}, the JSON was scored with {result['classifier']}")
    seed = result.get("floor_seed", args.seed)
    new = floors(ev, c.eval.batch_size, result["sizes"], seed, result["kid"])
    old = result["floor"]
    for metric in ("fd", "kid"):
        worst = max(abs(a - b) for a, b in zip(old[metric], new["floor"][metric], strict=True))
        if worst > 1e-6 * max(1.0, *map(abs, old[metric])):
            raise CompareError(f"the at-random floor's {metric} differs from the stored one by {worst:.3g} (another "
                               f"--seed than {seed}, or other data?)")
    log("balanced floor FD " + ", ".join(f"{v:.3f}" for v in new["floor_balanced"]["fd"]) + "; at-random floor as "
        "stored")
    return {**result, "floor_balanced": new["floor_balanced"], "floors_provenance": environment()}


def plot_checks(result: dict[str, Any], figures: Path, name: str) -> list[Path]:
    """FD and KID against n (mean ± sd over seeds, with the real-data floor) and the pixel histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures.mkdir(parents=True, exist_ok=True)
    sizes = result["sizes"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, label in ((axes[0], "fd", "classifier-FD"), (axes[1], "kid", "KID")):
        for v, seeds in result["sample_size"].items():
            arr = np.array([s[metric] for s in seeds.values()])
            m, sd = arr.mean(0), arr.std(0, ddof=1) if len(arr) > 1 else np.zeros(arr.shape[1])
            ax.plot(sizes, m, marker="o", markersize=3, label=v)
            ax.fill_between(sizes, m - sd, m + sd, alpha=0.15)
        if "floor_balanced" in result:
            ax.plot(sizes, result["floor_balanced"][metric], "k--", label="real images, class-balanced (floor)")
            ax.plot(sizes, result["floor"][metric], "k:", label="real images, at random")
        else:
            ax.plot(sizes, result["floor"][metric], "k--", label="real images (floor)")
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("samples n")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths = [figures / f"{name}-sample-size.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    edges = np.linspace(0, 256, len(result["histograms"]["real"]) + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    for v, h in result["histograms"].items():
        # the corrected variants dotted: each lies on top of the other arm's raw curve
        style = "k--" if v == "real" else (":" if "+" in v else "-")
        ax.plot(centres, h, style, linewidth=2 if "+" in v else 1.5, label=v)
    ax.set_yscale("log")
    ax.set_xlabel("pixel value")
    ax.set_ylabel("fraction of pixels")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(figures / f"{name}-pixel-histograms.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def checks_markdown(result: dict[str, Any], figures_link: str | None = None) -> str:
    """The checks as markdown: FD/KID against n with the floor, paired differences per feature network, the
    contrast stretch against the raw baseline, and the figures (``figures_link``: their folder as linked)."""
    from deltafm.study.markdown import fmt, pm, table
    from deltafm.study.paired import ci_text

    sizes, lines = result["sizes"], []

    def floor_row(label: str, floor: dict[str, list[float]]) -> list[str]:
        return [label, *[f"{fmt(f)} / {fmt(1e3 * k)}" for f, k in zip(floor["fd"], floor["kid"])]]

    if "floor_balanced" in result:
        rows = [floor_row("real images, class-balanced (floor)", result["floor_balanced"]),
                floor_row("real images, at random", result["floor"])]
        what = ("the floors are n real training images against the same reference, class-balanced in the samples' "
                "label order and drawn at random")
    else:
        rows = [floor_row("real images (floor)", result["floor"])]
        what = "the floor is n real training images against the same reference"
    for v, seeds in result["sample_size"].items():
        rows.append([v, *[f"{pm([s['fd'][i] for s in seeds.values()])} / "
                          f"{pm([1e3 * s['kid'][i] for s in seeds.values()])}" for i in range(len(sizes))]])
    lines += [f"FD / KID×10³ against the number of samples n (mean ± sd over seeds {result['seeds']}; {what}):", ""]
    lines += table(["", *[f"n = {n}" for n in sizes]], rows) + [""]

    def ci(p: dict[str, Any], scale: float = 1.0) -> str:
        if p["mean"] is None:
            return "–"
        low, high = p["ci95"] or (None, None)
        return ci_text(scale * p["mean"], *((scale * low, scale * high) if low is not None else ()))

    nets = list(result["networks"])
    head = ["variant", "baseline", "n", *[f"ΔFD ({n})" for n in nets], *[f"ΔKID×10³ ({n})" for n in nets]]
    rows = []
    for i, p in enumerate(result["paired"][f"{nets[0]}.fd"]):
        rows.append([p["variant"], p["baseline"], str(p["n"]),
                     *[ci(result["paired"][f"{n}.fd"][i]) for n in nets],
                     *[ci(result["paired"][f"{n}.kid"][i], 1e3) for n in nets]])
    lines += [f"Paired differences at n = {result['num']} per feature network (mean [95% t-interval] over seeds; "
              f"networks: {', '.join(nets)}):", ""] + table(head, rows) + [""]
    for name, pairs in result["paired"].items():
        if name.startswith("stretch."):
            rows = [[p["variant"].split("@", 1)[1], str(p["n"]), ci(p)] for p in pairs]
            lines += [f"Contrast stretch of {name[8:]} samples (pixels x → m + a (x − m), m the image mean): ΔFD "
                      "against the raw samples:", ""] + table(["a", "n", "ΔFD [95% CI]"], rows) + [""]
    if figures_link is not None:
        lines += [f"![FD and KID against n]({figures_link}/{result['study']}-sample-size.png)",
                  f"![pixel histograms]({figures_link}/{result['study']}-pixel-histograms.png)", ""]
    return "\n".join(lines)


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m deltafm.study.checks",
                      description="Sample-size, second-feature-network and contrast-stretch checks of a study.")
    p.add_argument("--config", required=True, type=Path, help="the study YAML")
    p.add_argument("--out", required=True, type=Path, help="the study's output folder (with runs/)")
    p.add_argument("--variants", nargs="+", help="variants to check (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds to check")
    p.add_argument("--num", type=int, default=4000, help="samples per variant and seed")
    p.add_argument("--sizes", nargs="+", type=int, default=[250, 500, 1000, 2000, 4000])
    p.add_argument("--classifier", help="the study's classifier (default: eval.classifier or OUT/classifier)")
    p.add_argument("--second-classifier", help="a second, independently trained classifier (.safetensors)")
    p.add_argument("--stretch", nargs="*", type=float, default=[0.9, 0.95, 1.05, 1.1, 1.2],
                   help="contrast factors a of the pixel-space control")
    p.add_argument("--stretch-variants", nargs="+", help="variants the stretch is applied to (default: baseline)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="seed of the real images drawn for the floor")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, required=True, help="write the results here")
    p.add_argument("--figures", type=Path, help="write the figures into this folder")
    p.add_argument("--markdown", type=Path, help="write the tables (markdown) here")
    p.add_argument("--update", type=Path, help="also replace the block between <!-- BEGIN checks:NAME --> and "
                                               "<!-- END checks:NAME --> of this markdown file (NAME: the study)")
    p.add_argument("--link-prefix", help="how the markdown links the figures folder (default: --figures)")
    p.add_argument("--from-json", action="store_true",
                   help="do not compute: redraw the figures and markdown from an existing --json")
    p.add_argument("--floors-only", action="store_true",
                   help="compute only the real-data floors (no sampling) into an existing --json, then redraw; "
                        "for results written before the class-balanced floor existed")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    args = build_parser().parse_args(argv)
    try:
        for name in ("num", "threads", "kid_subsets", "kid_subset_size"):
            if getattr(args, name) < 1:
                raise CompareError(f"--{name.replace('_', '-')} must be >= 1")
        if any(a <= 0 for a in args.stretch):
            raise CompareError("--stretch factors must be > 0")
        torch.set_num_threads(args.threads)
        if args.update is not None and not args.from_json:  # before the long work: the block must be there
            from deltafm.study.report import require_section

            try:
                require_section(args.update, load_compare_config(args.config).name, kind="checks")
            except ValueError as e:
                raise CompareError(str(e)) from None
        if args.from_json or args.floors_only:
            if not args.json.is_file():
                raise CompareError(f"--json {args.json}: no such file (--from-json and --floors-only read an earlier "
                                   "run's results)")
            from deltafm.hub import read_json

            result = read_json(args.json, CompareError)
            if not isinstance(result, dict) or result.get("format") != FORMAT:
                raise CompareError(f"--json {args.json}: not the results of python -m deltafm.study.checks ({FORMAT})")
            if args.floors_only:
                result = add_floors(args, result)
                args.json.write_text(json.dumps(result, indent=1) + "\n")
        else:
            result = run_checks(args)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1) + "\n")
        if args.figures is not None:
            plot_checks(result, args.figures, result["study"])
        link = args.link_prefix or (str(args.figures) if args.figures is not None else None)
        if args.markdown is not None:
            args.markdown.write_text(checks_markdown(result, link) + "\n")
        if args.update is not None:
            from deltafm.study.report import update_section

            try:
                update_section(args.update, result["study"], checks_markdown(result, link), kind="checks",
                               generated_by="python -m deltafm.study.checks")
            except ValueError as e:
                raise CompareError(str(e)) from None
    except CLI_ERRORS as e:
        print(cli_error(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
