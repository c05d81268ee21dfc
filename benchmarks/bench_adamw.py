"""AdamW's step alone on SiT-B/2's parameters: torch's loop, foreach and fused implementations.

    .venv/bin/python benchmarks/bench_adamw.py [--model SiT-B/2] [--repeats 7] [--threads 2]

Each implementation steps the model's fp32 parameters with fixed random gradients; printed is the median
of ``--repeats`` steps after one warm-up step (which allocates the moments). deltafm's
``deltafm.train.optim.build_adamw`` takes the fused kernel on CPU and CUDA; torch's default on CPU is the loop.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deltafm.models.registry import build_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="SiT-B/2")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    if a.repeats < 1 or a.threads < 1:
        p.error(f"--repeats and --threads must be at least 1, got {a.repeats} and {a.threads}")
    torch.set_num_threads(a.threads)
    try:
        model = build_model(a.model, in_channels=4, image_size=32, num_classes=1000)
    except (KeyError, ValueError) as e:
        p.error(f"--model {a.model!r}: {e}")
    params = list(model.parameters())
    g = torch.Generator().manual_seed(0)
    for q in params:
        q.grad = 1e-3 * torch.randn(q.shape, generator=g)
    print(f"{a.model}: {sum(q.numel() for q in params) / 1e6:.1f}M parameters in {len(params)} tensors, "
          f"{torch.get_num_threads()} thread(s)")
    print("| AdamW implementation | step ms (median) |\n|---|---|")
    for name, kw in (("loop (torch's CPU default)", {"foreach": False}), ("foreach", {"foreach": True}),
                     ("fused", {"fused": True})):
        opt = torch.optim.AdamW(params, lr=1e-4, **kw)
        opt.step()
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        print(f"| {name} | {1e3 * statistics.median(times):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
