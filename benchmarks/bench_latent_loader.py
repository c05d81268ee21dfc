"""Can the lazy latent loader feed training? Loader items/s against training-step images/s, in one run.

Measured in the same process, on this machine:

* the fp32 matmul rate (GFLOP/s of an n x n @ n x n product, best of a few; the machine's compute scale);
* loader items/s: a latent set of ``--items`` SiT-B/2-like items (4x32x32 float16 posterior mean **and**
  std, the SD-VAE latents of 256x256 images) in shards of ``--shard`` items, read for ``--epochs`` full
  epochs through :class:`deltafm.data.BatchLoader` (global batch ``--loader-batch``, one rank) with
  ``workers=0`` and ``workers=2``: every batch is read with ``pread``, value-checked, drawn
  z = μ + σ·ε and scaled. The files were just written, so they are read from the page cache (a warm
  cache; a cold read is bounded by the disk instead);
* training-step images/s of SiT-B/2 and of the small SiT-S/2 at latent 4x32x32 (1000 classes, fp32,
  ``--batch`` images, ΔFM λ = 0.05 with uniform negatives, AdamW; median of ``--steps`` after one warm-up);

and prints loader/step: how many times faster the loader produces items than a step consumes them
(> 1: the loader keeps up). Run with ``OMP_NUM_THREADS=1`` for one torch thread::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_latent_loader.py [--write]

``--write`` replaces this benchmark's section of benchmarks/RESULTS.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from deltafm.data import BatchLoader, EpochBatchSampler, LatentShardWriter, LatentStore
from deltafm.models import build_model
from deltafm.objective import DeltaFMObjective
from deltafm.provenance import cpu_model, git_commit
from deltafm.train.logging import measure_matmul_peak

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- bench_latent_loader:begin -->", "<!-- bench_latent_loader:end -->"
SHAPE = (4, 32, 32)


def write_set(root: Path, items: int, shard: int) -> int:
    """``items`` random items with std in shards of ``shard``; returns the bytes on disk."""
    g = torch.Generator().manual_seed(0)
    with LatentShardWriter(root, shard_size=shard, scale_factor=0.18215, num_classes=1000,
                           metadata={"vae": "bench"}) as w:
        for start in range(0, items, shard):
            n = min(shard, items - start)
            w.add(torch.randn(n, *SHAPE, generator=g) * 4, torch.randint(0, 1000, (n,), generator=g),
                  std=torch.rand(n, *SHAPE, generator=g) * 0.5)
    return sum(p.stat().st_size for p in w.paths)


def loader_rate(root: Path, batch: int, workers: int, epochs: int) -> float:
    """Items/s of ``epochs`` full epochs through the BatchLoader (after one warm-up batch)."""
    store = LatentStore(root)
    sampler = EpochBatchSampler(len(store), batch, seed=0)
    n = epochs * sampler.batches_per_epoch
    with BatchLoader(store, sampler, workers=workers, prefetch=2) as loader:
        next(loader)  # workers started, first batch through
        t0 = time.perf_counter()
        items = sum(next(loader)[0].shape[0] for _ in range(n - 1))
        return items / (time.perf_counter() - t0)


def step_rate(name: str, batch: int, steps: int) -> tuple[float, float, int]:
    """(images/s, forward GFLOP per image, params) of full training steps of ``name`` at latent 4x32x32."""
    torch.manual_seed(0)
    model = build_model(name, in_channels=SHAPE[0], image_size=SHAPE[1], num_classes=1000)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = DeltaFMObjective(lam=0.05, negatives="uniform", num_classes=1000, label_dropout=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, *SHAPE, generator=g), torch.randint(0, 1000, (batch,), generator=g)
    times = []
    for _ in range(1 + steps):
        t0 = time.perf_counter()
        objective(model, x, y, generator=g).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times[1:]), model.flops_per_sample() / 1e9, sum(
        p.numel() for p in model.parameters())


def machine() -> dict[str, str]:
    head, dirty = git_commit(ROOT, untracked=True)
    return {"cpu": cpu_model(), "cores": str(os.cpu_count()), "commit": (head or "") + (
                " (tree dirty: uncommitted changes)" if dirty else ""),
            "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "threads": str(torch.get_num_threads()), "load": f"{os.getloadavg()[0]:.1f}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=8192)
    p.add_argument("--shard", type=int, default=2048)
    p.add_argument("--loader-batch", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    info = machine()
    peak = measure_matmul_peak("cpu", torch.float32, size=1024, seconds=1.0) / 1e9
    print(f"matmul fp32: {peak:.1f} GFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        size = write_set(Path(tmp) / "lat", args.items, args.shard)
        loader = {w: loader_rate(Path(tmp) / "lat", args.loader_batch, w, args.epochs) for w in (0, 2)}
    for w, r in loader.items():
        print(f"loader workers={w}: {r:.0f} items/s", flush=True)
    steps = {}
    for name in ("SiT-B/2", "SiT-S/2"):
        steps[name] = step_rate(name, args.batch, args.steps)
        print(f"{name}: {steps[name][0]:.2f} img/s per step of {args.batch}", flush=True)
    rows = [f"| {name} | {params / 1e6:.1f}M | {gf:.1f} | {ips:.2f} | {loader[0] / ips:,.0f}x | "
            f"{loader[2] / ips:,.0f}x |" for name, (ips, gf, params) in steps.items()]
    given = " ".join(sys.argv[1:] if argv is None else argv)
    cmd = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_latent_loader.py" + (f" {given}" if given else "")
    section = "\n".join([
        BEGIN,
        "## Lazy latent loader against the training step (`benchmarks/bench_latent_loader.py`)",
        "",
        f"Command: `{cmd}`  ",
        f"Date: {info['date']}. Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
        f"{info['threads']} torch thread(s), load average {info['load']} at start (machine shared with other "
        f"jobs). Code: commit `{info['commit']}`.",
        "",
        f"Matmul fp32 (1024², best of 1 s): **{peak:.1f} GFLOP/s**. Latent set: {args.items} items of 4x32x32 "
        f"float16 μ and σ ({size / 2**20:.0f} MiB in shards of {args.shard}), read from the page cache for "
        f"{args.epochs} epochs, global batch {args.loader_batch}: **{loader[0]:,.0f} items/s** with "
        f"`workers=0`, **{loader[2]:,.0f} items/s** with `workers=2` (prefetch 2; pread + value check + "
        "z = μ + σ·ε + scale per batch).",
        "",
        f"| model (latent 4x32x32, 1000 classes) | params | fwd GFLOP/img | train step img/s (batch {args.batch}, "
        "fp32) | loader/step, workers=0 | loader/step, workers=2 |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "loader/step = loader items/s ÷ training-step images/s on the same cores: how many times faster the "
        "loader produces latents than one training process consumes them.",
        END,
    ])
    print(section)
    if args.write:
        text = RESULTS.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            text = head + section + rest.split(END, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
