"""The update after the backward pass alone, eager vs ``optim.fused_update``, on SiT's parameters.

    .venv/bin/python benchmarks/bench_update.py [--model SiT-B/2] [--rounds 7] [--threads 2]

Four setups in one process, each deltafm's update exactly as ``deltafm.train.step`` runs it
(``bench_reference.Update``: clipping at 1.0, AdamW, EMA 0.9999):

* ``eager``: fp32 gradients (``train.precision`` fp32 or bf16): clip_grad_norm_, torch's fused AdamW, EMA;
* ``eager+bf16c``: bf16 gradients of the bf16 compute copy: cast to the master, then as above, then the
  copy's refresh;
* ``fused`` and ``fused+bf16c``: the same through :class:`deltafm.train.fused_update.FusedUpdate` (the norm,
  then one compiled kernel per parameter tensor; compiled in the warm-up round).

Each round sets fixed random gradients (untimed) and times one update of every setup, in an order rotated
per round; printed are the medians and the paired ratio eager/fused per round (median, range). The bytes
each moves per parameter (module docstring of deltafm.train.fused_update: 52 / 68 eager, 40 / 38 fused with
the norm's read) give an effective bandwidth.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reference import Update  # noqa: E402

from deltafm.models.registry import build_model  # noqa: E402
from deltafm.train.bf16_compute import Bf16Compute  # noqa: E402

BYTES = {"eager": 52, "eager+bf16c": 68, "fused": 40, "fused+bf16c": 38}  # per parameter, read + written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="SiT-B/2")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    if a.rounds < 1 or a.threads < 1:
        p.error(f"--rounds and --threads must be at least 1, got {a.rounds} and {a.threads}")
    torch.set_num_threads(a.threads)
    setups: dict[str, tuple[Update, list[torch.Tensor]]] = {}
    for name in BYTES:
        torch.manual_seed(0)
        try:
            m = build_model(a.model, in_channels=4, image_size=32, num_classes=1000)
        except (KeyError, ValueError) as e:
            p.error(f"--model {a.model!r}: {e}")
        model = Bf16Compute(m) if "bf16c" in name else m
        upd = Update(model, full=True, fused_update=name.startswith("fused"))
        grads_of = [c for _, c in upd.bc.trained] if upd.bc is not None else upd.params
        setups[name] = (upd, grads_of)
    n = sum(q.numel() for q in setups["eager"][0].params)
    print(f"{a.model}: {n / 1e6:.1f}M parameters, {torch.get_num_threads()} thread(s), torch {torch.__version__}")

    def one(name: str, seed: int) -> float:
        upd, targets = setups[name]
        g = torch.Generator().manual_seed(seed)
        for q in targets:
            q.grad = (1e-3 * torch.randn(q.shape, generator=g)).to(q.dtype)
        t0 = time.perf_counter()
        upd(8)
        return time.perf_counter() - t0

    names = list(setups)
    for name in names:  # warm-up: AdamW state, the fused kernels' compilation
        t0 = time.perf_counter()
        one(name, 0)
        print(f"  warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(one(name, r + 1))
    print("\n| update | ms (median) | bytes/param | effective GB/s | eager/fused per round (median, range) |")
    print("|---|---|---|---|---|")
    for name in names:
        ms = 1e3 * statistics.median(times[name])
        ratio = ""
        if name.startswith("fused"):
            eager = times[name.replace("fused", "eager")]
            rs = sorted(e / f for e, f in zip(eager, times[name], strict=True))
            ratio = f"{statistics.median(rs):.2f}x ({rs[0]:.2f}-{rs[-1]:.2f})"
        print(f"| {name} | {ms:.0f} | {BYTES[name]} | {BYTES[name] * n / ms / 1e6:.0f} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
