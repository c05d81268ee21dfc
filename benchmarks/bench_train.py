"""Train-step time of ΔFM against flow matching on the same model and batch, side by side in one run.

For each model (the UNet of configs/fmnist-unet-deltafm.yaml and the SiT-N/4 of configs/fmnist-sit.yaml)
two copies with identical weights train on the same batches: one with plain flow matching
(``DeltaFMObjective(lam=0, negatives="none")``: no negative term at all) and one with ΔFM
(``lam=0.05``, uniform in-batch negatives). Steps alternate FM, ΔFM, ΔFM, FM, ... (so drifts in machine
load hit both equally) and each is timed end to end: forward under autocast, loss, backward, gradient
clipping, AdamW step. Reported: median step time of each, the ΔFM/FM ratio (median of the paired
per-round ratios, with a bootstrap 95% interval), images/s and MFU = 3 · forward FLOPs · images/s / peak,
the peak being a square-matmul rate measured in the same run and dtype.

    .venv/bin/python benchmarks/bench_train.py [--reps 30] [--batch 128] [--threads N] [--write]

``--write`` replaces this benchmark's section of benchmarks/RESULTS.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from deltafm.objective import DeltaFMObjective
from deltafm.train.builders import DataInfo, build_model_for
from deltafm.train.config import find_preset, load_config
from deltafm.train.logging import measure_matmul_peak

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- bench_train:begin -->", "<!-- bench_train:end -->"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def _step(model, opt, objective, x, y, gen, amp) -> float:
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        out = objective(model, x, y, generator=gen)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


class _Scale(torch.nn.Module):
    """A trivial 'model' v = w · x_t: isolates the cost of the objective itself (path sample, label dropout,
    negatives, loss, and their backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t, cond):
        return self.w * x


def objective_overhead(batch: int, rounds: int, precision: str) -> dict:
    """Median times of FM and ΔFM objective steps around a trivial model, interleaved, and the median of
    the paired differences (``extra``, ms): the cost of the ΔFM term itself."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, 1, 28, 28, generator=g) * 2 - 1, torch.randint(0, 10, (batch,), generator=g)
    models = {"fm": _Scale(), "dfm": _Scale()}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    objs = {
        "fm": DeltaFMObjective(lam=0.0, negatives="none", num_classes=10, label_dropout=0.1),
        "dfm": DeltaFMObjective(lam=0.05, negatives="uniform", num_classes=10, label_dropout=0.1),
    }
    gens = {k: torch.Generator().manual_seed(1) for k in models}
    times: dict[str, list[float]] = {"fm": [], "dfm": []}
    for r in range(20 + rounds):
        for k in (("fm", "dfm") if r % 2 == 0 else ("dfm", "fm")):
            times[k].append(_step(models[k], opts[k], objs[k], x, y, gens[k], DTYPES[precision]))
    fm, dfm = times["fm"][20:], times["dfm"][20:]
    return {"fm": 1000 * statistics.median(fm), "dfm": 1000 * statistics.median(dfm),
            "extra": 1000 * statistics.median(d - f for d, f in zip(dfm, fm))}


def _bootstrap_ci(ratios: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def bench(preset: str, batch: int, reps: int, warmup: int, precision: str, peak: float) -> dict:
    cfg = load_config(find_preset(preset), [f"train.batch_size={batch}"])
    info = DataInfo("bench", "images", 1, 28, 10, 60000)
    base = build_model_for(cfg, info)
    flops = base.flops_per_sample()
    models = {"fm": base, "dfm": copy.deepcopy(base)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    objs = {
        "fm": DeltaFMObjective(lam=0.0, negatives="none", num_classes=10, label_dropout=0.1),
        "dfm": DeltaFMObjective(lam=0.05, negatives="uniform", num_classes=10, label_dropout=0.1),
    }
    gens = {k: torch.Generator().manual_seed(1) for k in models}
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(batch, 1, 28, 28, generator=g) * 2 - 1, torch.randint(0, 10, (batch,), generator=g))
            for _ in range(4)]
    amp = DTYPES[precision]
    times: dict[str, list[float]] = {"fm": [], "dfm": []}
    for r in range(warmup + reps):
        x, y = data[r % len(data)]
        order = ("fm", "dfm") if r % 2 == 0 else ("dfm", "fm")
        for k in order:
            dt = _step(models[k], opts[k], objs[k], x, y, gens[k], amp)
            if r >= warmup:
                times[k].append(dt)
    ratios = [d / f for d, f in zip(times["dfm"], times["fm"])]
    fm, dfm = statistics.median(times["fm"]), statistics.median(times["dfm"])
    lo, hi = _bootstrap_ci(ratios)
    ips_fm, ips_dfm = batch / fm, batch / dfm
    return {
        "preset": preset,
        "model": f"{cfg.model.name} ({preset})",
        "params": sum(p.numel() for p in base.parameters()),
        "flops": flops,
        "fm_ms": 1000 * fm,
        "dfm_ms": 1000 * dfm,
        "ratio": statistics.median(ratios),
        "ci": (lo, hi),
        "ips_fm": ips_fm,
        "ips_dfm": ips_dfm,
        "mfu_fm": 3 * flops * ips_fm / peak,
        "mfu_dfm": 3 * flops * ips_dfm / peak,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["fmnist-unet-deltafm", "fmnist-sit"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=30, help="timed rounds (each one FM and one ΔFM step)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=list(DTYPES), default="bf16")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    peak_dtype = DTYPES[args.precision] or torch.float32
    peak = measure_matmul_peak("cpu", peak_dtype, seconds=1.0)
    peak32 = measure_matmul_peak("cpu", torch.float32, seconds=0.5) if peak_dtype != torch.float32 else peak
    over = objective_overhead(args.batch, 1000, args.precision)
    print(f"objective alone (trivial model): FM {over['fm']:.2f} ms, ΔFM {over['dfm']:.2f} ms, "
          f"paired extra {over['extra']:.2f} ms", flush=True)
    rows = []
    for preset in args.presets:
        r = bench(preset, args.batch, args.reps, args.warmup, args.precision, peak)
        rows.append(r)
        print(f"{preset}: FM {r['fm_ms']:.1f} ms, ΔFM {r['dfm_ms']:.1f} ms, ratio {r['ratio']:.4f} "
              f"[{r['ci'][0]:.4f}, {r['ci'][1]:.4f}], {r['ips_dfm']:.0f} img/s, MFU {100 * r['mfu_dfm']:.1f}%",
              flush=True)
    cmd = "python benchmarks/bench_train.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        BEGIN,
        "## Train step: ΔFM vs flow matching (`benchmarks/bench_train.py`)",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {platform.machine()} CPU, {threads} torch thread(s), torch {torch.__version__}, "
        f"{args.precision} autocast, batch {args.batch}, {args.reps} interleaved rounds after {args.warmup} warm-up. "
        f"Matmul peak measured in the same run: {peak / 1e9:.0f} GFLOP/s ({args.precision}), "
        f"{peak32 / 1e9:.0f} GFLOP/s (fp32). Load average at start: {load:.1f} on {os.cpu_count()} cores "
        "(other jobs share the machine: absolute times are pessimistic, the interleaved ratio is not).",
        "",
        "| model | params | fwd MFLOP/img | FM ms/step | ΔFM ms/step | ΔFM/FM (95% CI) | ΔFM term / FM step "
        "| ΔFM img/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    extra = over["extra"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['flops'] / 1e6:.0f} | {r['fm_ms']:.1f} | "
            f"{r['dfm_ms']:.1f} | {r['ratio']:.4f} ({r['ci'][0]:.4f}–{r['ci'][1]:.4f}) | "
            f"{100 * extra / r['fm_ms']:.2f}% | {r['ips_dfm']:.0f} | {100 * r['mfu_dfm']:.1f}% |"
        )
    lines += [
        "",
        "FM = `DeltaFMObjective(lam=0, negatives='none')`; ΔFM = lam 0.05 with uniform in-batch negatives; same "
        "weights, batches and optimizer. The ratio is the median of per-round ΔFM/FM step-time ratios (steps "
        "alternate FM/ΔFM/ΔFM/FM). \"ΔFM term / FM step\": the extra time of the ΔFM objective measured "
        f"around a trivial model v = w·x (median of 1000 paired differences: {over['extra']:.2f} ms per step "
        f"of {args.batch}; FM {over['fm']:.2f} ms, ΔFM {over['dfm']:.2f} ms), divided by the full FM step: the "
        "overhead without the noise of the full-step timing. "
        "MFU = 3 x forward FLOPs x img/s / measured matmul peak.",
        END,
    ]
    section = "\n".join(lines)
    print(section)
    if args.write:
        text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            text = head + section + rest.split(END, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
