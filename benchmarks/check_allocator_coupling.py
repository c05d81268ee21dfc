"""Does one model's optimizer update slow another's forward/backward when both live in one process?

    .venv/bin/python benchmarks/check_allocator_coupling.py MIRROR [--rounds 10]
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824 \\
        .venv/bin/python benchmarks/check_allocator_coupling.py MIRROR      # glibc keeps freed memory

A 2×2 in one process, bf16 autocast, SiT-B/2 batch 8, fused SDPA attention: model (the reference's SiT or
deltafm's) × update after the backward pass (the reference's: clipping, torch's default AdamW, which is a
loop over the parameters on CPU, and a per-parameter EMA; or deltafm's: clipping, fused AdamW, foreach EMA;
:class:`bench_reference.Update`). The four cells step in rotated order, one step each per round, as
``bench_reference.py`` without ``--isolate`` does. Printed per cell: medians of the whole step, of the update
and of step − update (forward + backward). If the models did not interact, forward + backward would depend
on the model only, not on the update its cell uses.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_reference as br  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mirror", help="the reference's models/sit.py, a checkout or its git directory")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    if a.rounds < 1 or a.threads < 1:
        p.error(f"--rounds and --threads must be at least 1, got {a.rounds} and {a.threads}")
    torch.set_num_threads(a.threads)
    try:
        ref = br.load_reference(a.mirror)
    except (FileNotFoundError, subprocess.CalledProcessError) as e:
        p.error(f"cannot read the reference from {a.mirror}: {e}")
    torch.manual_seed(0)
    first = br.build_pair(ref, "B", ["sdpa"], ["sdpa"], "cpu")
    second = br.build_pair(ref, "B", ["sdpa"], ["sdpa"], "cpu")
    cells = {("reference model", "reference update"): first["ref[sdpa]"],
             ("reference model", "deltafm update"): second["ref[sdpa]"],
             ("deltafm model", "reference update"): first["deltafm[sdpa]"],
             ("deltafm model", "deltafm update"): second["deltafm[sdpa]"]}
    upd = {k: br.Update(m, True, k[1] == "reference update", "cpu") for k, m in cells.items()}
    x, y, _ = br._inputs("B", 8, "cpu", False)
    for k, m in cells.items():
        for _ in range(2):
            br.train_step(m, upd[k], x, y, True)
    res: dict = {k: [] for k in cells}
    names = list(cells)
    for r in range(a.rounds):
        for k in names[r % 4:] + names[:r % 4]:
            res[k].append(br.train_step(cells[k], upd[k], x, y, True))
    print(f"{br.machine()}; {a.rounds} rounds")
    print("| model | update | step ms | update ms | forward+backward ms |\n|---|---|---|---|---|")
    for (model, update), v in res.items():
        step, up = statistics.median(s for s, _ in v), statistics.median(u for _, u in v)
        fb = statistics.median(s - u for s, u in v)
        print(f"| {model} | {update} | {1e3 * step:.0f} | {1e3 * up:.0f} | {1e3 * fb:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
