"""One-shot GPU readiness check: short SiT-XL/2 ΔFM training and CFG sampling on synthetic latents.

    python benchmarks/gpu_check.py [--mirror GIT_DIR] [--steps 30] [--batch 64] [--no-compile]
    python benchmarks/gpu_check.py --smoke        # tiny shapes on CPU, a few seconds (used by the tests)

On CUDA: TF32 on for fp32 matmuls, bf16 autocast, ``torch.compile(model, dynamic=False)``, clipping, fused AdamW, EMA,
synthetic 4×32×32 latents already on the device. It prints the training img/s, the sampling img/s
(Euler, classifier-free guidance: one forward of the doubled batch per step), the bf16 matmul rate it
measures itself (n×n products, 2n³ FLOP each), the MFU

    MFU = 3 · F_fwd · batch / step time / matmul rate        (F_fwd = SiT.flops_per_sample()),

the peak memory, and whether one training step runs under ``torch.cuda.set_sync_debug_mode("error")``
(i.e. with no host sync). With ``--mirror`` it then runs benchmarks/bench_reference.py there (SiT-B/2 and
SiT-XL/2 side by side with the reference ΔFM SiT, with deltafm's fused and plain attention and its bf16-compute
copy), and last SiT-XL/2's bf16 copy with and without ``optim.fused_update`` (never run on CUDA before; a
failure there is printed and does not stop the script). Budget: well under 8 minutes including compilation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reference import Update, matmul_rate, sample_time, train_step  # noqa: E402
from bench_reference import main as bench_reference_main  # noqa: E402

from deltafm.models.registry import build_model  # noqa: E402


def _sync_free_step(model: torch.nn.Module, upd: Update, x: torch.Tensor, y: torch.Tensor) -> str:
    """Run one step with CUDA's sync debug mode set to "error": "yes" if no host sync happened."""
    if x.device.type != "cuda":
        return "n/a (CPU)"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step(model, upd, x, y, True, sync=False)  # the timer's own synchronize would trip the check
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        verdict = "yes"
    except RuntimeError as err:
        verdict = f"no ({str(err).splitlines()[0][:100]})"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return verdict


def check(model_name: str, image: int, batch: int, steps: int, nfe: int, device: str, compile_: bool) -> dict:
    """Train ``steps`` ΔFM steps (bf16) and sample once; returns the measured rates."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = build_model(model_name, in_channels=4, image_size=image, num_classes=1000).to(dev)
    flops = 3 * model.flops_per_sample() * batch  # type: ignore[operator]
    run = torch.compile(model, dynamic=False) if compile_ else model
    upd = Update(run, full=True, device=dev.type)  # deltafm's own update: clipping, fused AdamW, EMA
    x = torch.randn(batch, 4, image, image, device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)
    t0 = time.perf_counter()
    train_step(run, upd, x, y, True)  # compilation happens here
    first = time.perf_counter() - t0
    warm = [train_step(run, upd, x, y, True)[0] for _ in range(max(1, steps))]
    step = sorted(warm)[len(warm) // 2]
    sync_free = _sync_free_step(run, upd, x, y)
    sample_time(run, x, y, 1, True, 1000)  # compiles the inference graph
    samp = sample_time(run, x, y, nfe, True, 1000)
    rate = matmul_rate(torch.bfloat16, 8192 if dev.type == "cuda" else 256, device=device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    return dict(model=model_name, batch=batch, first_step_s=first, step_ms=1e3 * step, train_img_s=batch / step,
                sample_img_s=batch / samp, nfe=nfe, bf16_gflops=rate, mfu=flops / step / (rate * 1e9),
                peak_gib=peak, sync_free=sync_free)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the check, print the numbers, optionally run the side-by-side harness."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, no compile (for tests)")
    p.add_argument("--mirror", default=None, help="git dir of gstoica27/DeltaFM: also run bench_reference")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--nfe", type=int, default=50)
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args(argv)
    if a.smoke:
        res = check("SiT-N/4", 8, 2, 2, 2, "cpu", False)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device; use --smoke for the CPU smoke run")
            return 2
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
        res = check("SiT-XL/2", 32, a.batch, a.steps, a.nfe, "cuda", not a.no_compile)
    print(f"{res['model']} batch {res['batch']} bf16{' + compile' if not (a.smoke or a.no_compile) else ''}: "
          f"first step (incl. compile) {res['first_step_s']:.1f} s, step {res['step_ms']:.1f} ms, "
          f"train {res['train_img_s']:.1f} img/s, sample {res['sample_img_s']:.2f} img/s at NFE {res['nfe']} "
          f"with CFG, bf16 matmul {res['bf16_gflops']:.0f} GFLOP/s, MFU {100 * res['mfu']:.1f}%, "
          f"peak memory {res['peak_gib']:.2f} GiB, step free of host syncs: {res['sync_free']}", flush=True)
    if a.mirror and not a.smoke:
        bench_reference_main([a.mirror, "--device", "cuda", "--configs", "B,XL", "--batch", "32",
                              "--rounds", "5", "--nfe", "10", "--variants", "sdpa,matmul,sdpa+bf16c"])
        # The fused update (optim.fused_update) has never run on CUDA: last, so that whatever happens to it
        # (a compile failure, the script's time limit) the tables above are already printed.
        try:
            bench_reference_main([a.mirror, "--device", "cuda", "--configs", "XL", "--batch", "32", "--rounds", "3",
                                  "--nfe", "0", "--precisions", "bf16", "--variants", "sdpa+bf16c,sdpa+bf16c+fu"])
        except (Exception, SystemExit) as e:  # noqa: BLE001  (report and go on: this part is an extra)
            print(f"the fused-update comparison on CUDA failed: {type(e).__name__}: {e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
