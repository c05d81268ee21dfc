"""What the matrix products alone of one SiT-B/2 bf16 training step reach, against the square-matmul rate.

    .venv/bin/python benchmarks/gemm_ceiling.py [--batch 8 16 32] [--threads 2]

Per block (12 blocks, width D = 768, 256 tokens, 12 heads, M = batch · 256 rows), the four Linear layers
qkv (D→3D), proj (D→D), fc1 (D→4D), fc2 (4D→D), each as its forward product and the two backward products
(input and weight gradient, 3 · 2·M·in·out FLOP), and attention's six batched products (QKᵀ and PV forward,
four backward, 2·T²·d each per head). No element-wise work, no update. The time of these GEMMs alone (best of
5) against the n×n rate (n = 1024, best of 20) bounds what an eager step can reach: the MFU of
benchmarks/bench_reference.py counts the same FLOPs over the whole step.
"""

from __future__ import annotations

import argparse
import time

import torch

T, D, H, DEPTH = 256, 768, 12, 12
LINEARS = [(D, 3 * D), (D, D), (D, 4 * D), (4 * D, D)]


def ceiling(batch: int, dtype: torch.dtype = torch.bfloat16) -> tuple[float, float]:
    """(GFLOP/s of the step's GEMMs, GFLOP/s of a 1024² product) at ``batch``."""
    m = batch * T
    acts = {k: torch.randn(m, k, dtype=dtype) for k in {i for i, _ in LINEARS} | {o for _, o in LINEARS}}
    weights = [torch.randn(o, i, dtype=dtype) for i, o in LINEARS]
    q, k = (torch.randn(batch * H, T, D // H, dtype=dtype) for _ in range(2))
    s = torch.randn(batch * H, T, T, dtype=dtype)

    def block() -> None:
        for (i, o), w in zip(LINEARS, weights, strict=True):
            acts[i] @ w.t()  # forward
            acts[o] @ w  # input gradient
            acts[o].t() @ acts[i]  # weight gradient
        q @ k.transpose(1, 2)  # scores
        s @ q  # P V
        s @ k, s.transpose(1, 2) @ q, s.transpose(1, 2) @ k, (s @ q) @ q.transpose(1, 2)  # backward products

    flop = DEPTH * (sum(3 * 2 * m * i * o for i, o in LINEARS) + 6 * 2 * batch * H * T * T * (D // H))
    block()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(DEPTH):
            block()
        best = min(best, time.perf_counter() - t0)
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    a @ b
    sq = float("inf")
    for _ in range(20):
        t0 = time.perf_counter()
        a @ b
        sq = min(sq, time.perf_counter() - t0)
    return flop / best / 1e9, 2 * 1024**3 / sq / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    if min(a.batch) < 1 or a.threads < 1:
        p.error(f"--batch and --threads must be at least 1, got {a.batch} and {a.threads}")
    torch.set_num_threads(a.threads)
    print("| batch | GEMMs of the step (GFLOP/s) | 1024² product (GFLOP/s) | ratio |\n|---|---|---|---|")
    for b in a.batch:
        g, sq = ceiling(b)
        print(f"| {b} | {g:.0f} | {sq:.0f} | {g / sq:.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
