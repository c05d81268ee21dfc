"""The update after the backward pass alone, eager vs ``optim.fused_update``, on SiT's parameters.

    .venv/bin/python benchmarks/bench_update.py [--model SiT-B/2] [--rounds 5] [--steps 3] [--threads 2]

Four setups, each in a fresh process of its own per round (one at a time, order rotated per round: in one
process the setups' allocations interfere, as benchmarks/check_allocator_coupling.py shows for whole steps),
each deltafm's update exactly as ``deltafm.train.step`` runs it
(``bench_reference.Update``: clipping at 1.0, AdamW, EMA 0.9999):

* ``eager``: fp32 gradients (``train.precision`` fp32 or bf16): clip_grad_norm_, torch's fused AdamW, EMA;
* ``eager+bf16c``: bf16 gradients of the bf16 compute copy: cast to the master, then as above, then the
  copy's refresh;
* ``fused`` and ``fused+bf16c``: the same through :class:`deltafm.train.fused_update.FusedUpdate` (the norm,
  then one compiled kernel per parameter tensor; compiled in the warm-up round).

A process sets fixed random gradients (untimed) before each update and reports the median of ``--steps``
timed updates after one warm-up update; printed are the medians over rounds and the paired ratio
eager/fused per round (median, range). The bytes
each moves per parameter (module docstring of deltafm.train.fused_update: 52 / 68 eager, 40 / 38 fused with
the norm's read) give an effective bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reference import Update  # noqa: E402

from deltafm.models.registry import build_model  # noqa: E402
from deltafm.train.bf16_compute import Bf16Compute  # noqa: E402

BYTES = {"eager": 52, "eager+bf16c": 68, "fused": 40, "fused+bf16c": 38}  # per parameter, read + written


def _setup(name: str, model_name: str) -> tuple[Update, list[torch.Tensor]]:
    torch.manual_seed(0)
    m = build_model(model_name, in_channels=4, image_size=32, num_classes=1000)
    upd = Update(Bf16Compute(m) if "bf16c" in name else m, full=True, fused_update=name.startswith("fused"))
    return upd, ([c for _, c in upd.bc.trained] if upd.bc is not None else upd.params)


def worker(name: str, model_name: str, steps: int) -> dict[str, float]:
    """One setup alone in this process: a warm-up update (AdamW state, compilation), then ``steps`` timed
    updates, each after fresh gradients are set (untimed). Returns the warm-up and the median seconds."""
    upd, targets = _setup(name, model_name)

    def one(seed: int) -> float:
        g = torch.Generator().manual_seed(seed)
        for q in targets:
            q.grad = (1e-3 * torch.randn(q.shape, generator=g)).to(q.dtype)
        t0 = time.perf_counter()
        upd(8)
        return time.perf_counter() - t0

    warm = one(0)
    return {"warm": warm, "median": statistics.median(one(s + 1) for s in range(steps)),
            "params": sum(q.numel() for q in upd.params)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="SiT-B/2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed updates per process (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one setup, JSON line out
    a = p.parse_args(argv)
    if min(a.rounds, a.steps, a.threads) < 1:
        p.error(f"--rounds, --steps and --threads must be at least 1, got {a.rounds}, {a.steps}, {a.threads}")
    torch.set_num_threads(a.threads)
    try:
        build_model(a.model, in_channels=4, image_size=32, num_classes=1000, depth=1)
    except (KeyError, ValueError, TypeError) as e:
        p.error(f"--model {a.model!r}: {e}")
    if a.worker:
        print(json.dumps(worker(a.worker, a.model, a.steps)))
        return 0
    names = list(BYTES)
    print(f"{a.model}, {a.threads} thread(s), torch {torch.__version__}; every setup in its own process per "
          f"round, {a.steps} timed update(s) each", flush=True)
    times: dict[str, list[float]] = {k: [] for k in names}
    n = 0
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            out = subprocess.run([sys.executable, __file__, "--model", a.model, "--steps", str(a.steps),
                                  "--threads", str(a.threads), "--worker", name], capture_output=True, text=True)
            if out.returncode or not out.stdout.strip():
                raise SystemExit(f"worker {name} failed (rc {out.returncode}):\n{out.stderr[-2000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            times[name].append(res["median"])
            n = int(res["params"])
            print(f"  round {r + 1} {name}: {1e3 * res['median']:.0f} ms (warm-up {res['warm']:.1f} s)", flush=True)
    print(f"\n{a.model}: {n / 1e6:.1f}M parameters\n")
    print("| update | ms (median) | bytes/param | effective GB/s | eager/fused per round (median, range) |")
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
