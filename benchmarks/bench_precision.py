"""Train-step time of the CPU presets under fp32, bf16 autocast, channels_last and torch.compile, side by side.

For each preset model (the UNet of configs/fmnist-unet-deltafm.yaml, the SiT-N/4 of configs/fmnist-sit.yaml)
one copy per variant is built with identical weights; rounds run every variant once, in an order that
rotates each round (so drifts in machine load hit all variants alike), each step timed end to end:
ΔFM objective forward under the variant's autocast, backward, gradient clipping, AdamW.  Reported: the
median step time per variant and its ratio to fp32 (median of per-round ratios).

    .venv/bin/python benchmarks/bench_precision.py [--reps 10] [--threads N] [--compile] [--write]

``--compile`` adds torch.compile variants (20 s to several minutes of compilation per model on CPU).
``--write`` replaces this benchmark's section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

from deltafm.objective import DeltaFMObjective
from deltafm.train.builders import DataInfo, build_model_for
from deltafm.train.config import find_preset, load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import _step  # noqa: E402  (one timed step, shared with the ΔFM-vs-FM benchmark)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- bench_precision:begin -->", "<!-- bench_precision:end -->"


def _variants(is_conv: bool, with_compile: bool) -> list[tuple[str, torch.dtype | None, bool, bool]]:
    """(name, autocast dtype, channels_last, compile)."""
    out = [("fp32", None, False, False), ("bf16", torch.bfloat16, False, False)]
    if is_conv:
        out += [("fp32 + channels_last", None, True, False), ("bf16 + channels_last", torch.bfloat16, True, False)]
    if with_compile:
        out.append(("bf16 + compile", torch.bfloat16, False, True))
    return out


def bench(preset: str, batch: int, reps: int, warmup: int, with_compile: bool) -> dict:
    cfg = load_config(find_preset(preset))
    info = DataInfo("bench", "images", 1, 28, 10, 60000)
    base = build_model_for(cfg, info, seed=0)
    is_conv = any(isinstance(m, torch.nn.Conv2d) and m.kernel_size != m.stride for m in base.modules())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 28, 28, generator=g) * 2 - 1
    y = torch.randint(0, 10, (batch,), generator=g)
    runs = []
    for name, amp, cl, comp in _variants(is_conv, with_compile):
        model = copy.deepcopy(base)
        xin = x
        if cl:
            model = model.to(memory_format=torch.channels_last)
            xin = x.contiguous(memory_format=torch.channels_last)
        fwd = torch.compile(model) if comp else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        obj = DeltaFMObjective(lam=0.05, num_classes=10, label_dropout=0.1)
        runs.append(dict(name=name, model=fwd, opt=opt, obj=obj, x=xin, amp=amp, times=[]))
    for _ in range(warmup):
        for r in runs:
            _step(r["model"], r["opt"], r["obj"], r["x"], y, torch.Generator().manual_seed(1), r["amp"])
    for k in range(reps):
        order = runs[k % len(runs) :] + runs[: k % len(runs)]
        for r in order:
            r["times"].append(
                _step(r["model"], r["opt"], r["obj"], r["x"], y, torch.Generator().manual_seed(k), r["amp"])
            )
    ref = runs[0]["times"]
    rows = []
    for r in runs:
        ratio = statistics.median(a / b for a, b in zip(ref, r["times"]))
        rows.append(dict(variant=r["name"], ms=1000 * statistics.median(r["times"]), speedup=ratio))
    return dict(preset=preset, model=cfg.model.name, rows=rows)


def _markdown(results: list[dict], args: argparse.Namespace, threads: int, load: float) -> str:
    lines = [
        BEGIN,
        "## Train step: precision, memory layout and compilation (`benchmarks/bench_precision.py`)",
        "",
        f"Command: `python benchmarks/bench_precision.py --reps {args.reps} --threads {threads}"
        + (" --compile" if args.compile else "")
        + " --write`  ",
        f"Machine: {platform.machine()} CPU, {threads} torch thread(s), torch {torch.__version__}, batch {args.batch}, "
        f"ΔFM λ=0.05, {args.reps} rotated rounds after {args.warmup} warm-up. Load average at start: {load:.1f}.",
        "",
        "| preset (model) | variant | ms/step | speed-up vs fp32 |",
        "|---|---|---|---|",
    ]
    for res in results:
        for row in res["rows"]:
            lines.append(
                f"| {res['preset']} ({res['model']}) | {row['variant']} | {row['ms']:.0f} | {row['speedup']:.2f}x |"
            )
    lines += [
        "",
        "Speed-up = median over rounds of (fp32 step time / variant step time), measured in the same run.",
        END,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["fmnist-unet-deltafm", "fmnist-sit"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load = os.getloadavg()[0]
    results = [bench(pr, args.batch, args.reps, args.warmup, args.compile) for pr in args.presets]
    md = _markdown(results, args, threads, load)
    print(md)
    if args.write:
        text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
        if BEGIN in text:
            head, rest = text.split(BEGIN, 1)
            text = head + md + rest.split(END, 1)[1]
        else:
            text = text.rstrip() + "\n\n" + md + "\n"
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
