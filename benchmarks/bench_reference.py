"""deltafm's SiT against the reference ΔFM code's SiT: same shapes, same ΔFM step, interleaved rounds.

    .venv/bin/python benchmarks/bench_reference.py MIRROR_GIT_DIR [--rounds N] [--configs S,B]
        [--threads T] [--batch B] [--nfe 4] [--variants sdpa,matmul+bf16c,...] [--ref-variants sdpa,matmul]
        [--precisions fp32,bf16] [--step full|model] [--repa] [--device cuda] [--write]

MIRROR_GIT_DIR is a git directory (bare or not) of github gstoica27/DeltaFM, a checkout of it, or its
``models/sit.py`` itself (where no git is at hand, e.g. on a lent GPU machine). The file is read at run time
(``git show`` for a git directory), written into a temporary directory and imported from there (it is never
copied into this repository); its three timm layers get minimal stand-ins (timm needs torchvision, which
does not work beside the CPU torch wheel): PatchEmbed = stride-p conv + flatten, Attention = fused qkv
Linear + ``F.scaled_dot_product_attention`` + proj (timm's fused path), Mlp = fc1 → GELU(tanh) → fc2.
The reference is built with a tiny REPA projector (z_dims=[8]), whose cost is negligible.

One training step, identical for every variant: x_t on the straight path, v = model(x_t, t, y) (under bf16
autocast for the bf16 rows), the ΔFM loss

    L = mean_i ‖v_i − u_i‖² / d − λ · mean_i ‖v_i − u_{j(i)}‖² / d,   j(i) ≠ i uniform, λ = 0.05,

backward, then what each codebase's training loop does after the backward pass (``--step``, below). Each
round runs every variant once, in an order rotated per round; the ratio
ref/variant is taken per round (paired), and its median gets a 95% bootstrap CI over rounds. The fp32 and
bf16 matmul rates (2·n³ FLOP per n×n product, best of 1 s) are measured in the same run, at its start and
again at its end, and MFU = 3 · forward FLOPs · batch / step time / the higher of the two rates (a rate
measured while the machine was briefly slower would otherwise flatter MFU). Sampling: Euler with
classifier-free guidance (2 forwards of the batch per step, ``torch.inference_mode``), images/s at ``--nfe``
steps.

``--repa``: the REPA step instead. Both models carry REPA's projector (width 2048, one encoder of width 768,
DINOv2-B's; block 4 for S/B, 8 for L/XL), the step adds 0.5 · L_REPA (``deltafm.alignment.alignment_loss``,
the same function for both) against fixed encoder tokens on the 16×16 grid (the encoder's own forward is
the same for both and left out). deltafm's model is :class:`deltafm.alignment.AlignedModel`; the
reference's SiT computes its projections inside every forward (sampling included), deltafm's only when
asked (``align=True``).

Variant modifier ``+keep`` (``--isolate`` only): that variant's worker processes tell glibc to keep freed
memory before they build the model (:func:`deltafm.train.allocator.keep_freed_memory`, ``train.keep_freed_memory``;
at commit `8e7bea5` the harness set the equivalent environment variables instead); paired per round against the
same variant without it.

Variant modifier ``+fu``: deltafm's ``optim.fused_update`` (:class:`deltafm.train.fused_update.FusedUpdate`):
clipping, AdamW, the copy's refresh and the EMA in one compiled kernel per parameter tensor; its kernels
compile in the warm-up steps.

Variant ``IMPL+bf16c`` (bf16 rows only): deltafm's ``train.precision: bf16-compute``
(:class:`deltafm.train.bf16_compute.Bf16Compute`): the forward and backward run on a bf16 copy of the
weights without autocast, AdamW steps the fp32 master, and the copy is refreshed after it; the cast of the
gradients and the refresh are part of the timed step. Sampling runs the bf16 copy.

``--step full`` (default): after the backward pass each side does what its training loop does (:class:`Update`):
the reference as its ``train.py`` (gradient-norm clipping at 1.0, ``torch.optim.AdamW`` with torch's default
implementation: a loop over the parameters on CPU, ``foreach`` on CUDA; EMA 0.9999 per parameter,
e ← e·β + p·(1 − β), a stand-in written here), deltafm as ``deltafm.train.step`` (clipping at 1.0,
:func:`deltafm.train.optim.build_adamw`: the fused kernel on CPU and CUDA; :class:`deltafm.train.ema.EMA`). The
column "update ms" is that part of the step. ``--step model`` (the protocol of the tables before 2026-12-03's
fused-AdamW table): the same AdamW for both (fused on CUDA, the loop on CPU), no clipping, no EMA, so only the
models differ.

``--isolate``: each round runs every model in a fresh process of its own (one at a time, rotated order;
build, 2 warm-up steps, then the median of ``--steps-per-round`` timed steps is the round's value). In one
process the models share glibc's allocator, and on CPU a model's forward/backward time there depended on
which updates the other models ran (benchmarks/check_allocator_coupling.py: +2% for the reference's SiT
next to loop-AdamW updates in one run, +24% in an in-process run of this harness; it varies between runs),
so ratios between codebases whose updates differ are measured isolated.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltafm.alignment import AlignedModel, alignment_loss
from deltafm.models.registry import build_model
from deltafm.train.allocator import keep_freed_memory
from deltafm.train.bf16_compute import Bf16Compute
from deltafm.train.config import OptimConfig
from deltafm.train.ema import EMA
from deltafm.train.fused_update import FusedUpdate
from deltafm.train.optim import build_adamw

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
MODIFIERS = ("bf16c", "compile", "fu", "keep")  # bf16 compute copy, torch.compile, fused update, glibc keeps memory



class _PatchEmbed(nn.Module):
    """Stand-in for timm's PatchEmbed: stride-p convolution, (B, D, h, w) → (B, h·w, D)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.patch_size = (patch_size, patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _Attention(nn.Module):
    """Stand-in for timm's Attention (fused path): qkv Linear, SDPA per head, proj Linear."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, **_: object) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fused_attn = True  # the reference's --fused-attn (default True); False: timm's plain ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    """Stand-in for timm's Mlp: fc1 → act → fc2."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: Callable = nn.GELU, **_: object) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(in_features, hidden_features), act_layer(), nn.Linear(
            hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def reference_source(where: str) -> str:
    """The text of the reference's ``models/sit.py``: ``where`` is that file itself, a checkout holding
    ``models/sit.py``, or a git directory (bare or not; read with ``git show HEAD:models/sit.py``)."""
    p = Path(where)
    if p.is_file():
        return p.read_text()
    if (p / "models" / "sit.py").is_file():
        return (p / "models" / "sit.py").read_text()
    if not p.is_dir():
        raise FileNotFoundError(f"{where}: no reference (models/sit.py, a checkout or a git directory of it)")
    return subprocess.run(["git", f"--git-dir={where}", "show", "HEAD:models/sit.py"],
                          capture_output=True, text=True, check=True).stdout


def load_reference(git_dir: str) -> types.ModuleType:
    """Import the reference's ``models/sit.py`` (:func:`reference_source`: the file, a checkout or a git
    directory; read at run time, never kept in this repository)."""
    src = reference_source(git_dir)
    vt = types.ModuleType("timm.models.vision_transformer")
    vt.PatchEmbed, vt.Attention, vt.Mlp = _PatchEmbed, _Attention, _Mlp  # type: ignore[attr-defined]
    sys.modules.update({"timm": types.ModuleType("timm"), "timm.models": types.ModuleType("timm.models"),
                        "timm.models.vision_transformer": vt})
    path = Path(tempfile.mkdtemp(prefix="ref_sit_")) / "ref_sit.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("ref_sit", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def dfm_loss(v: torch.Tensor, target: torch.Tensor, lam: float = 0.05) -> torch.Tensor:
    """ΔFM loss with one uniformly drawn other-index negative per sample (see the module docstring)."""
    b = v.shape[0]
    j = (torch.arange(b, device=v.device) + 1 + torch.randint(0, b - 1, (b,), device=v.device)) % b
    pos = (v - target).pow(2).flatten(1).mean(1)
    neg = (v - target[j]).pow(2).flatten(1).mean(1)
    return (pos - lam * neg).mean()


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work (timing only; a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _RefAligned(nn.Module):
    """The reference SiT called like :class:`AlignedModel`: ``(v, zs)`` with ``align=True``, else v."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, align: bool = False):
        out = self.model(x, t, y)
        return (out[0], out[1]) if align else out[0]


def _bf16_compute(model: nn.Module) -> Bf16Compute | None:
    """The :class:`Bf16Compute` behind ``model`` (itself or compiled), or None."""
    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, Bf16Compute) else None


class Update:
    """What one codebase's training loop does after the backward pass (timed as part of the step).

    ``full`` (``--step full``): the reference (``reference=True``) as its train.py: clip_grad_norm_(1.0),
    torch.optim.AdamW(lr=1e-4) with torch's default implementation, EMA per parameter with mul_ and add_;
    deltafm as deltafm.train.step: (bf16-compute: gradients → fp32 master) clip_grad_norm_(1.0),
    build_adamw (fused on CPU/CUDA), (bf16-compute: copy ← bf16(master)), EMA.update (one foreach lerp).
    Not ``full`` (``--step model``): AdamW only, the same for both sides (fused on CUDA, torch's default
    elsewhere); a bf16-compute variant still casts its gradients and refreshes its copy.
    """

    def __init__(self, model: nn.Module, full: bool = True, reference: bool = False, device: str = "cpu",
                 fused_update: bool = False) -> None:
        self.bc = _bf16_compute(model)
        self.net = self.bc.master if self.bc is not None else getattr(model, "_orig_mod", model)
        self.params = list(self.net.parameters())  # AdamW steps the fp32 master of a bf16-compute variant
        self.full, self.images = full, 0
        if full and not reference:
            self.opt = build_adamw(self.params, OptimConfig(lr=1e-4), torch.device(device))
        else:
            self.opt = torch.optim.AdamW(self.params, lr=1e-4, fused=(device == "cuda" and not full) or None)
        self.ema = EMA(self.net, decay=0.9999) if full and not reference else None
        self.ref_ema = [p.detach().clone() for p in self.params] if full and reference else None
        fuse = full and fused_update and not reference
        self.fu = FusedUpdate(self.opt, self.net, self.ema, self.bc) if fuse else None

    @torch.no_grad()
    def _reference_ema(self, decay: float = 0.9999) -> None:
        """The reference's EMA step: every parameter, e ← e·decay + p·(1 − decay), two kernels each."""
        for e, p in zip(self.ref_ema or [], self.params, strict=True):
            e.mul_(decay).add_(p, alpha=1 - decay)

    def __call__(self, batch: int) -> None:
        if self.fu is not None:  # deltafm's optim.fused_update: clipping, AdamW, copy and EMA in one pass
            assert self.ema is not None
            self.images += batch
            self.fu.step(self.fu.grad_norm(), 1.0, self.ema.beta(batch, self.images))
            return
        if self.bc is not None:
            self.bc.grads_to_master()
        if self.full:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.bc is not None:
            self.bc.refresh()
        self.images += batch
        if self.ema is not None:
            self.ema.update(self.net, batch, self.images)
        if self.ref_ema is not None:
            self._reference_ema()


class _Clock:
    """Marks inside a step without a host sync: perf_counter on CPU, recorded CUDA events on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self, i: int, j: int) -> float:
        """Seconds from mark i to mark j (on CUDA only after the caller synchronised)."""
        a, b = self.marks[i], self.marks[j]
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


def train_step(model: nn.Module, update: Update, x: torch.Tensor, y: torch.Tensor, bf16: bool,
               sync: bool = True, tokens: list[torch.Tensor] | None = None) -> tuple[float, float]:
    """One timed ΔFM step (+ 0.5 · REPA against ``tokens`` when given), then ``update``; returns (step
    seconds, update seconds). Tuple outputs (the reference's) use element 0.

    The step itself has no host sync; on CUDA the timer synchronises before and after it (``sync``; without
    it the times are host-side, of queueing the work).
    """
    if sync:
        _sync(x.device)
    t0 = time.perf_counter()
    clock = _Clock(x.device if sync else torch.device("cpu"))
    t = torch.rand(x.shape[0], device=x.device)
    eps = torch.randn_like(x)
    tt = t[:, None, None, None]
    xt, target = tt * x + (1 - tt) * eps, x - eps
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16 and update.bc is None):
        out = model(xt, t, y, align=True) if tokens is not None else model(xt, t, y)
    v = out[0] if isinstance(out, tuple) else out
    loss = dfm_loss(v.float(), target)
    if tokens is not None:
        loss = loss + 0.5 * alignment_loss(out[1], tokens)
    loss.backward()
    clock.mark()
    update(x.shape[0])
    clock.mark()
    if sync:
        _sync(x.device)
    return time.perf_counter() - t0, clock.seconds(0, 1)


@torch.inference_mode()
def sample_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor, nfe: int, bf16: bool, null: int) -> float:
    """Seconds for an Euler sampler with CFG (scale 1.5): each step one forward of the doubled batch."""
    model.eval()
    _sync(x.device)
    t0 = time.perf_counter()
    yy = torch.cat([y, torch.full_like(y, null)])
    autocast = bf16 and _bf16_compute(model) is None
    for k in range(nfe):
        t = torch.full((2 * x.shape[0],), k / nfe, device=x.device)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(torch.cat([x, x]), t, yy)
        v = (out[0] if isinstance(out, tuple) else out).float()
        vc, vu = v.chunk(2)
        x = x + (vu + 1.5 * (vc - vu)) / nfe
    _sync(x.device)
    model.train()
    return time.perf_counter() - t0


def matmul_rate(dtype: torch.dtype, n: int = 1024, seconds: float = 1.0, device: str = "cpu") -> float:
    """Best GFLOP/s of an n×n by n×n product (2n³ FLOP) over ``seconds`` of repeats."""
    dev = torch.device(device)
    a, b = torch.randn(n, n, device=dev).to(dtype), torch.randn(n, n, device=dev).to(dtype)
    a @ b
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        _sync(dev)
        t0 = time.perf_counter()
        a @ b
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def bootstrap_ci(values: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the median of ``values``."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(reps))
    return meds[int(0.025 * reps)], meds[int(0.975 * reps) - 1]


def build_pair(ref: types.ModuleType, size: str, variants: list[str], ref_variants: list[str],
               device: str, repa: bool = False, only: str | None = None) -> dict[str, nn.Module]:
    """Reference SiT-size/2 models ("ref[sdpa]" first: the baseline) and deltafm's, one per variant
    (``only``: just the model of that name, e.g. "deltafm[sdpa+bf16c]").

    A variant is an attention implementation ("sdpa" or "matmul"), optionally with "+bf16c" (bf16 compute
    copy, :class:`Bf16Compute`) and/or "+compile" (``torch.compile(model, dynamic=False)``; its first steps,
    which compile, are warm-up).
    """
    depth, hid, heads = SIZES[size]
    enc_depth = (4 if depth <= 12 else 8) if repa else depth
    zdim, pdim = (768, 2048) if repa else (8, 8)
    models: dict[str, nn.Module] = {}
    for impl in ["sdpa", *(v for v in ref_variants if v != "sdpa")]:
        if only not in (None, f"ref[{impl}]"):
            continue
        r = ref.SiT(
            input_size=32, in_channels=4, num_classes=1000, encoder_depth=enc_depth, z_dims=[zdim],
            projector_dim=pdim, qk_norm=False, fused_attn=impl == "sdpa", depth=depth, hidden_size=hid,
            decoder_hidden_size=hid, patch_size=2, num_heads=heads)
        models[f"ref[{impl}]"] = _RefAligned(r) if repa else r
    for var in variants:
        impl, *mods = var.split("+")
        if set(mods) - set(MODIFIERS):
            raise SystemExit(f"unknown variant modifier in {var!r}: use IMPL[+bf16c][+compile][+fu][+keep]")
        if only not in (None, f"deltafm[{var}]"):
            continue
        m = build_model(f"SiT-{size}/2", in_channels=4, image_size=32, num_classes=1000, attn_impl=impl).to(device)
        if repa:
            m = AlignedModel(m, [zdim], encoder_depth=enc_depth, projector_dim=pdim)
        if "bf16c" in mods:
            m = Bf16Compute(m)
        models[f"deltafm[{var}]"] = torch.compile(m, dynamic=False) if "compile" in mods else m
    return {k: m.to(device) for k, m in models.items()}  # a Bf16Compute copies a model already on the device


def _inputs(size: str, batch: int, device: str, repa: bool) -> tuple[torch.Tensor, torch.Tensor, list | None]:
    """The batch every variant trains on (its own generator: the same in every process)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 32, 32, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    tokens = [torch.randn(batch, 256, 768, generator=g).to(device)] if repa else None
    return x, y, tokens


def _in_process(ref: types.ModuleType, size: str, batch: int, rounds: int, variants: list[str], nfe: int,
                device: str, ref_variants: tuple[str, ...], repa: bool, full: bool, bf16: bool) -> dict:
    """Every model in this process, one step (and one sampling run) each per round, rotated order.
    Returns {name: {"step": [...], "upd": [...], "sample": [...]}}, one entry per round."""
    torch.manual_seed(0)
    all_models = build_pair(ref, size, variants, list(ref_variants), device, repa)
    x, y, tokens = _inputs(size, batch, device, repa)
    # bf16-compute variants have bf16 rows only (in fp32 they would be the plain variant)
    models = {k: m for k, m in all_models.items() if bf16 or _bf16_compute(m) is None}
    upds = {k: Update(m, full, k.startswith("ref["), device, "+fu" in k) for k, m in models.items()}
    for k, m in models.items():  # warm-up: compilation, allocator, oneDNN primitives, AdamW state
        warm = [train_step(m, upds[k], x, y, bf16, tokens=tokens)[0] for _ in range(2)]
        print(f"  {size} {'bf16' if bf16 else 'fp32'} {k}: warm-up steps {warm[0]:.1f} s, {warm[1]:.1f} s",
              flush=True)
        if nfe:
            sample_time(m, x, y, 1, bf16, 1000)
    res: dict[str, dict[str, list[float]]] = {k: {"step": [], "upd": [], "sample": []} for k in models}
    names = list(models)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            step_s, upd_s = train_step(models[k], upds[k], x, y, bf16, tokens=tokens)
            res[k]["step"].append(step_s)
            res[k]["upd"].append(upd_s)
        for k in order if nfe else []:
            res[k]["sample"].append(sample_time(models[k], x, y, nfe, bf16, 1000))
    return res


def worker(ref: types.ModuleType, name: str, size: str, batch: int, steps: int, nfe: int, device: str,
           repa: bool, full: bool, bf16: bool) -> dict[str, float]:
    """One model alone in this process (``--isolate``): build, warm up (2 steps, one sampling run), then
    the medians of ``steps`` timed steps and of ``max(1, steps // 2)`` sampling runs."""
    if "+keep" in name:  # before the model and its first step allocate
        keep_freed_memory()
    torch.manual_seed(0)
    impl = name[name.index("[") + 1:-1]
    models = build_pair(ref, size, [impl] if name.startswith("deltafm[") else [],
                        [impl] if name.startswith("ref[") else [], device, repa, only=name)
    (m,) = models.values()
    x, y, tokens = _inputs(size, batch, device, repa)
    upd = Update(m, full, name.startswith("ref["), device, "+fu" in name)
    for _ in range(2):
        train_step(m, upd, x, y, bf16, tokens=tokens)
    timed = [train_step(m, upd, x, y, bf16, tokens=tokens) for _ in range(steps)]
    out = {"step": statistics.median(a for a, _ in timed), "upd": statistics.median(b for _, b in timed)}
    if nfe:
        sample_time(m, x, y, 1, bf16, 1000)
        out["sample"] = statistics.median(sample_time(m, x, y, nfe, bf16, 1000) for _ in range(max(1, steps // 2)))
    return out


def _isolated(mirror: str, size: str, batch: int, rounds: int, names: list[str], nfe: int, device: str,
              repa: bool, full: bool, bf16: bool, steps: int, threads: int) -> dict:
    """``--isolate``: each round starts one process per model in rotated order, one at a time (so no model
    shares an allocator, caches or AdamW temporaries with another); a round's value of a model is the
    median of its ``steps`` timed steps in that process."""
    res: dict[str, dict[str, list[float]]] = {k: {"step": [], "upd": [], "sample": []} for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            cmd = [sys.executable, str(Path(__file__).resolve()), mirror, "--worker", k, "--configs", size,
                   "--batch", str(batch), "--nfe", str(nfe), "--device", device, "--threads", str(threads),
                   "--precisions", "bf16" if bf16 else "fp32", "--steps-per-round", str(steps),
                   "--step", "full" if full else "model", *(["--repa"] if repa else [])]
            done = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in done.stdout.splitlines() if ln.startswith("WORKER ")]
            if done.returncode or not line:
                raise SystemExit(f"worker {k} failed (rc {done.returncode}):\n{done.stderr[-2000:]}")
            got = json.loads(line[-1][len("WORKER "):])
            for key, v in got.items():
                res[k][key].append(v)
            print(f"  round {r + 1}/{rounds} {'bf16' if bf16 else 'fp32'} {k}: step {got['step']:.2f} s", flush=True)
    return res


def run_config(ref: types.ModuleType, size: str, batch: int, rounds: int, variants: list[str],
               nfe: int, device: str = "cpu", ref_variants: tuple[str, ...] = ("sdpa",),
               repa: bool = False, full: bool = True, precisions: tuple[str, ...] = ("fp32", "bf16"),
               isolate: str | None = None, steps: int = 3, threads: int = 2) -> list[dict]:
    """Interleaved training and sampling rounds for one model size; one result row per (variant, precision).
    ``full``: each side's own update after the backward pass (:class:`Update`); ``isolate``: the mirror
    path, to run every model in its own process per round (:func:`_isolated`)."""
    flops = 3 * build_model(f"SiT-{size}/2", in_channels=4, image_size=32, num_classes=1000).flops_per_sample() * batch
    refs = ["sdpa", *(v for v in ref_variants if v != "sdpa")]
    rows = []
    for bf16 in [p == "bf16" for p in ("fp32", "bf16") if p in precisions]:
        if isolate:
            names = [f"ref[{v}]" for v in refs] + [f"deltafm[{v}]" for v in variants if bf16 or "bf16c" not in v]
            res = _isolated(isolate, size, batch, rounds, names, nfe, device, repa, full, bf16, steps, threads)
        else:
            res = _in_process(ref, size, batch, rounds, variants, nfe, device, ref_variants, repa, full, bf16)
        base = res["ref[sdpa]"]
        for k, r in res.items():
            ratios = [a / b for a, b in zip(base["step"], r["step"], strict=True)]
            row = dict(size=size, repa=repa, batch=batch, prec="bf16" if bf16 else "fp32", name=k,
                       ms=1e3 * statistics.median(r["step"]), upd_ms=1e3 * statistics.median(r["upd"]),
                       ratio=statistics.median(ratios), ci=bootstrap_ci(ratios), flops=flops)
            row["pairs"] = []
            for mod in ("fu", "keep"):  # paired per round against the same variant without the modifier
                plain = k.replace(f"+{mod}", "")
                if plain != k and plain in res:
                    fr = [a / b for a, b in zip(res[plain]["step"], r["step"], strict=True)]
                    ur = [a / b for a, b in zip(res[plain]["upd"], r["upd"], strict=True)]
                    fb = [(a - u) / (b - v) for a, u, b, v in zip(res[plain]["step"], res[plain]["upd"], r["step"],
                                                                   r["upd"], strict=True)]
                    row["pairs"].append(dict(of=plain, step=(statistics.median(fr), bootstrap_ci(fr)),
                                             upd=(statistics.median(ur), bootstrap_ci(ur)),
                                             fb=(statistics.median(fb), bootstrap_ci(fb))))
            if nfe:
                sr = [a / b for a, b in zip(base["sample"], r["sample"], strict=True)]
                row.update(img_s=batch / statistics.median(r["sample"]), s_ratio=statistics.median(sr),
                           s_ci=bootstrap_ci(sr))
            rows.append(row)
            print(_row_md(row, None), flush=True)
    return rows


def _row_md(row: dict, rates: dict[str, float] | None) -> str:
    mfu = f"{100 * row['flops'] / (row['ms'] / 1e3) / (rates[row['prec']] * 1e9):.0f}%" if rates else "-"
    lo, hi = row["ci"]
    model = f"{'REPA-' if row.get('repa') else ''}SiT-{row['size']}/2"
    s = (f"| {model} b{row['batch']} | {row['prec']} | {row['name']} | {row['ms']:.0f} | {row['upd_ms']:.0f} | "
         f"{row['ratio']:.3f} ({lo:.3f}–{hi:.3f}) | {mfu} |")
    if "img_s" in row:
        slo, shi = row["s_ci"]
        s += f" {row['img_s']:.2f} | {row['s_ratio']:.3f} ({slo:.3f}–{shi:.3f}) |"
    return s


def _pair_lines(rows: list[dict]) -> list[str]:
    """One line per ``+fu`` / ``+keep`` row and modifier: step, update and forward+backward (step − update)
    against the same variant without that modifier, paired per round."""
    def f(x: tuple[float, tuple[float, float]]) -> str:
        return f"{x[0]:.3f} ({x[1][0]:.3f}–{x[1][1]:.3f})"
    out = [f"Paired, {q['of']} / {r['name']} per round (median, 95% CI): step {f(q['step'])}, update "
           f"{f(q['upd'])}, forward+backward {f(q['fb'])}.  " for r in rows for q in r.get("pairs", [])]
    return [*out, ""] if out else []


def machine() -> str:
    """CPU model, cores, torch version and the commit of this tree."""
    from deltafm.provenance import cpu_model, git_commit

    head, dirty = git_commit(ROOT, untracked=True)
    head = head or ""
    return (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
            f"commit `{head[:12]}`{' (tree dirty)' if dirty else ''}")


def report(rows: list[dict], rates: dict[str, float], argv: list[str], nfe: int, full: bool = True,
           isolate: bool = False, end: dict[str, float] | None = None) -> str:
    """The markdown section: command, date, machine, matmul rates, one table row per variant. ``rates``: the
    matmul rates measured at the run's start; ``end``: those measured at its end, if taken, in which case MFU
    is taken against the higher of the two."""
    start, rates = rates, {k: max(v, end[k]) for k, v in rates.items()} if end else rates
    rate = f"fp32 **{rates['fp32']:.0f} GFLOP/s**, bf16 **{rates['bf16']:.0f} GFLOP/s**"
    if end:
        rate += (f" (the higher of start and end: fp32 {start['fp32']:.0f} and {end['fp32']:.0f}, bf16 "
                 f"{start['bf16']:.0f} and {end['bf16']:.0f})")
    head = "| model | precision | variant | step ms (median) | of which update ms | ref/variant step (95% CI) | MFU |"
    sep = "|---|---|---|---|---|---|---|"
    if nfe:
        head += f" sample img/s (NFE {nfe}, CFG) | ref/variant sampling (95% CI) |"
        sep += "---|---|"
    lines = [
        "## deltafm SiT vs the reference ΔFM SiT, side by side (`benchmarks/bench_reference.py`)", "",
        f"Command: `.venv/bin/python benchmarks/bench_reference.py {' '.join(argv)}`  ",
        f"Date: {datetime.date.today()}. Machine: {machine()}. Matmul rate in the same run (n×n, best of "
        f"1 s): {rate}; load average at "
        f"the end {os.getloadavg()[0]:.1f}.", "", head, sep, *(_row_md(r, rates) for r in rows), "",
        *_pair_lines(rows),
        "ref/variant = step time of the reference as published (ref[sdpa]: fused SDPA attention) / the row's "
        "(median of per-round ratios); > 1: the row is faster. ref[matmul] is the reference run with its "
        "--no-fused-attn. MFU = 3 × "
        "forward FLOPs × batch / step time / matmul rate of the row's precision. Update = what follows the "
        "backward pass: " + ("each side's own training loop (reference: clipping, AdamW with torch's default "
        "implementation, per-parameter EMA; deltafm: clipping, fused AdamW, foreach EMA; `--step full`)."
        if full else "the same AdamW for both, no clipping, no EMA (`--step model`).") + (
            " Every model ran in its own process, one per round (`--isolate`), its round's value the median of "
            "its timed steps there." if isolate else " All models in one process, one step each per round."), "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run every config, print (and with --write append) the markdown section."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mirror", help="git directory of github gstoica27/DeltaFM")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--configs", default="S,B")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--nfe", type=int, default=0, help="sampling steps to time (0: no sampling rows)")
    p.add_argument("--variants", default="sdpa,matmul",
                   help="deltafm variants: sdpa|matmul[+bf16c][+compile][+fu][+keep],...")
    p.add_argument("--ref-variants", default="sdpa", help="reference attention: sdpa (--fused-attn), matmul")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repa", action="store_true", help="time the REPA (+ΔFM) step: projectors and L_REPA")
    p.add_argument("--precisions", default="fp32,bf16", help="fp32, bf16 or both (comma-separated)")
    p.add_argument("--step", choices=("full", "model"), default="full",
                   help="full: each side's own clipping/AdamW/EMA; model: the same AdamW for both, nothing else")
    p.add_argument("--isolate", action="store_true",
                   help="every model in its own process, one per round and model (CPU: no shared allocator)")
    p.add_argument("--steps-per-round", type=int, default=3, help="--isolate: timed steps per process (median)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one model, JSON line out
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    a = p.parse_args(argv)
    if not a.precisions or set(a.precisions.split(",")) - {"fp32", "bf16"}:
        p.error(f"--precisions {a.precisions!r}: give fp32, bf16 or fp32,bf16")
    for var in a.variants.split(","):
        impl, *mods = var.split("+")
        if impl not in ("sdpa", "matmul") or set(mods) - set(MODIFIERS):
            p.error(f"--variants: {var!r} is not IMPL[+bf16c][+compile][+fu][+keep] with IMPL sdpa or matmul")
        if "keep" in mods and not a.isolate:
            p.error(f"--variants: {var!r}: +keep (glibc keeping freed memory, set per process) needs --isolate")
        if "fu" in mods and a.step != "full":
            p.error(f"--variants: {var!r}: +fu (the fused update) needs --step full")
    if set(a.ref_variants.split(",")) - {"sdpa", "matmul"}:
        p.error(f"--ref-variants {a.ref_variants!r}: give sdpa, matmul or sdpa,matmul")
    for name in ("rounds", "batch", "steps_per_round", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    torch.set_num_threads(a.threads)
    try:
        ref = load_reference(a.mirror)
    except (FileNotFoundError, subprocess.CalledProcessError) as e:
        p.error(f"cannot read the reference from {a.mirror}: {e}")
    if a.worker:
        got = worker(ref, a.worker, a.configs, a.batch, a.steps_per_round, a.nfe, a.device, a.repa,
                     a.step == "full", a.precisions == "bf16")
        print("WORKER " + json.dumps(got), flush=True)
        return 0
    n = 8192 if a.device == "cuda" else 1024
    dtypes = (("fp32", torch.float32), ("bf16", torch.bfloat16))
    start = {k: matmul_rate(dt, n, device=a.device) for k, dt in dtypes}
    print(f"matmul GFLOP/s: fp32 {start['fp32']:.0f}, bf16 {start['bf16']:.0f}", flush=True)
    rows = []
    for size in a.configs.split(","):
        rows += run_config(ref, size, a.batch, a.rounds, a.variants.split(","), a.nfe, a.device,
                           tuple(a.ref_variants.split(",")), a.repa, a.step == "full", tuple(a.precisions.split(",")),
                           a.mirror if a.isolate else None, a.steps_per_round, a.threads)
    end = {k: matmul_rate(dt, n, device=a.device) for k, dt in dtypes}
    text = report(rows, start, argv, a.nfe, a.step == "full", a.isolate, end)
    print(text)
    if a.write:
        with RESULTS.open("a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
