"""What REPA and ΔFM each add to a SiT training step, and whether together they cost more than their sum.

    .venv/bin/python benchmarks/bench_repa.py [--model SiT-B/2] [--batch 8] [--rounds 12] [--threads 2]
        [--encoder-dim 768] [--bf16] [--write]

Four steps on the same model, batch and data (4×32×32 latents, 1000 classes), each a full optimizer step
of deltafm's objective (:class:`deltafm.DeltaFMObjective`: path sample, forward, loss, backward, AdamW):

    FM          λ = 0
    ΔFM         λ = 0.05, uniform in-batch negatives
    REPA        λ = 0 plus the REPA term (projector width 2048, block 4 of SiT-B/2 / 8 of larger models, one
                encoder of width ``--encoder-dim`` with precomputed tokens on the model's grid)
    REPA+ΔFM    both

The encoder's own forward (DINOv2 on the fly) is the same in both REPA steps and is left out, so the rows
isolate the training-side cost. Each round runs the four steps once in a rotated order; per round the
extra costs ΔFM − FM and (REPA+ΔFM) − REPA are paired, and the claim checked is

    t(REPA+ΔFM) − t(REPA)  ≈  t(ΔFM) − t(FM)      (the ΔFM term costs the same with or without REPA)

reported as medians with 95% bootstrap intervals over rounds, beside the matmul rate measured in the same
run. ``--write`` appends the section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

import deltafm
from deltafm.alignment import AlignedModel
from deltafm.models.registry import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reference import bootstrap_ci, machine, matmul_rate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
VARIANTS = ("FM", "ΔFM", "REPA", "REPA+ΔFM")


def _setup(model_name: str, enc_dim: int, batch: int):
    torch.manual_seed(0)
    sit = build_model(model_name, in_channels=4, image_size=32, num_classes=1000)
    depth = 4 if sit.depth <= 12 else 8
    model = AlignedModel(sit, [enc_dim], encoder_depth=depth, projector_dim=2048)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 32, 32, generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    tokens = [torch.randn(batch, sit.grid[0] * sit.grid[1], enc_dim, generator=g)]
    objectives = {
        "FM": deltafm.DeltaFMObjective(lam=0.0, negatives="none", num_classes=1000, align_coeff=0.5),
        "ΔFM": deltafm.DeltaFMObjective(lam=0.05, negatives="uniform", num_classes=1000, align_coeff=0.5),
    }
    return model, opt, x, y, tokens, objectives


def _step(model, opt, obj, x, y, tokens, bf16: bool, gen: torch.Generator) -> float:
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = obj(model, x, y, generator=gen, align_targets=tokens)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def measure(a: argparse.Namespace) -> dict:
    model, opt, x, y, tokens, objs = _setup(a.model, a.encoder_dim, a.batch)
    gen = torch.Generator().manual_seed(1)
    plan = {v: (objs["ΔFM" if "ΔFM" in v else "FM"], tokens if "REPA" in v else None) for v in VARIANTS}
    for v in VARIANTS:  # warm-up
        _step(model, opt, *plan[v][:1], x, y, plan[v][1], a.bf16, gen)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(a.rounds):
        order = VARIANTS[r % 4:] + VARIANTS[:r % 4]
        for v in order:
            obj, tok = plan[v]
            times[v].append(_step(model, opt, obj, x, y, tok, a.bf16, gen))
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{v} {times[v][-1]:.3f}s" for v in VARIANTS), flush=True)
    dfm = [d - f for d, f in zip(times["ΔFM"], times["FM"])]
    both = [b - r for b, r in zip(times["REPA+ΔFM"], times["REPA"])]
    repa = [r - f for r, f in zip(times["REPA"], times["FM"])]
    excess = [b - d for b, d in zip(both, dfm)]
    return {"times": times, "dfm": dfm, "both": both, "repa": repa, "excess": excess}


def report(a: argparse.Namespace, res: dict, rate: float, argv: list[str]) -> str:
    med = {v: statistics.median(ts) for v, ts in res["times"].items()}
    fm = med["FM"]

    def row(name: str, vals: list[float]) -> str:
        lo, hi = bootstrap_ci(vals)
        m = statistics.median(vals)
        return f"| {name} | {1000 * m:+.1f} ms [{1000 * lo:+.1f}, {1000 * hi:+.1f}] | {100 * m / fm:+.2f}% |"

    lines = [
        f"### REPA and ΔFM step costs ({a.model}, batch {a.batch}, {'bf16' if a.bf16 else 'fp32'})", "",
        f"`{' '.join(['.venv/bin/python benchmarks/bench_repa.py', *argv])}` — {datetime.date.today()}, "
        f"{machine()}, {a.rounds} rounds; matmul rate in the same run "
        f"{rate:.0f} GFLOP/s ({'bf16' if a.bf16 else 'fp32'}).", "",
        "| step | median time |", "|---|---|",
        *[f"| {v} | {1000 * med[v]:.1f} ms |" for v in VARIANTS], "",
        "| extra cost (paired per round) | median [95% CI] | of the FM step |", "|---|---|---|",
        row("ΔFM − FM", res["dfm"]), row("REPA − FM", res["repa"]), row("(REPA+ΔFM) − REPA", res["both"]),
        row("excess: ((REPA+ΔFM) − REPA) − (ΔFM − FM)", res["excess"]), "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="SiT-B/2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--encoder-dim", type=int, default=768)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--write", action="store_true", help="append the section to benchmarks/RESULTS.md")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rate = matmul_rate(torch.bfloat16 if a.bf16 else torch.float32)
    res = measure(a)
    text = report(a, res, rate, argv)
    print(text)
    if a.write:
        with open(RESULTS, "a") as fh:
            fh.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
