"""What follows the backward pass, in one pass over memory (``optim.fused_update``).

In eager, the update after a backward pass reads and writes every trained parameter's state several times.
Bytes per parameter (fp32 master and AdamW state; bf16 gradients and compute copy under ``bf16-compute``):

    step                                        reads   writes
    θ.grad ← fp32(g)         (bf16-compute)       2       4
    ‖g‖                      (clipping)           4       -
    g ← c · g                (clipping)           4       4
    AdamW (torch's fused kernel)                 16      12
    copy ← bf16(θ)           (bf16-compute)       4       2
    EMA θ̄ ← θ̄ + (1 − β)(θ − θ̄)                    8       4

that is 68 B per parameter with the bf16 copy and 52 B without, all memory-bound. :class:`FusedUpdate`
makes it two passes: the gradient norm (one read of g in its own dtype, accumulated in fp32), then one
generated element-wise kernel per parameter tensor (``torch.compile``) that reads g, θ, m, v, θ̄ once and
writes θ, m, v, θ̄ (and the copy) once, 36 B per parameter either way:

    c  = min(1, max_norm / (‖g‖ + 1e-6))                                       (torch's clip_grad_norm_)
    ĝ  = c · fp32(g)
    k ← k + 1,   m ← m + (1 − β1)(ĝ − m),   v ← β2 v + (1 − β2) ĝ²
    θ ← θ (1 − lr·wd) − lr / (1 − β1ᵏ) · m / (sqrt(v) / sqrt(1 − β2ᵏ) + eps)   (AdamW, decoupled decay)
    θ̄ ← θ̄ + (1 − β)(θ − θ̄)                                                    (the EMA, when on)
    θ₁₆ ← bf16(θ)                                                              (bf16-compute's copy)

This is the eager path's arithmetic in the eager path's order, so the two agree to fp32 rounding (not bit
for bit: other kernels; ``tests/test_fused_update.py``); each is deterministic, so resume stays bit-exact
with either. The optimizer state stays torch's AdamW state (``opt.state[θ]``: ``step``, ``exp_avg``,
``exp_avg_sq``): checkpoints do not change, and a run resumes with this switched on or off.

Each kernel is compiled for one tensor length (``dynamic=False``; a kernel compiled for any length was
clearly slower in an uncommitted side check, so no number is quoted), so there is one compilation per
distinct parameter size, at the first step (inductor caches them on disk for later processes). Nothing
reads a tensor's value on the host: the clipping factor and the bias corrections are computed on the device.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor, nn

from deltafm.errors import UserError

from .bf16_compute import Bf16Compute
from .ema import EMA

__all__ = ["FusedUpdate", "FusedUpdateError"]

_SCALARS = 16  # one row of per-tensor scalars (9 used), padded to 64 bytes


class FusedUpdateError(UserError, RuntimeError):
    """torch.compile could not build the fused update's kernel (on CPU it needs a C++ compiler)."""


def _kernel(p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: Tensor, e: Tensor | None, c: Tensor | None) -> None:
    """One (flattened) parameter tensor's update, in place; ``s`` = [c, 1 − lr·wd, 1 − β1, β2, 1 − β2, eps,
    1 − β, lr / (1 − β1ᵏ), sqrt(1 − β2ᵏ), ...] (see the module docstring)."""
    coef, decay, one_minus_b1, b2, one_minus_b2, eps, w, step_size, bc2_sqrt = s[:9].unbind(0)
    gh = g.float() * coef
    m1 = m + one_minus_b1 * (gh - m)
    v1 = b2 * v + one_minus_b2 * gh * gh
    p1 = p * decay - step_size * m1 / (torch.sqrt(v1) / bc2_sqrt + eps)
    p.copy_(p1)
    m.copy_(m1)
    v.copy_(v1)
    if e is not None:
        e.copy_(e + w * (p1 - e))
    if c is not None:
        c.copy_(p1)


def _sum_of_squares(g: Tensor) -> Tensor:
    """Σ fp32(g)² of one (flattened) gradient, accumulated in fp32."""
    g32 = g.float()
    return (g32 * g32).sum()


_KERNELS: dict[tuple, Any] = {}


def _compiled(fn: Any, *key: Any) -> Any:
    """``torch.compile(fn, dynamic=False)`` for one ``key`` (tensor length, dtypes, device, ...).

    Each key gets its own copy of ``fn``'s code object: dynamo keeps its compiled versions per code object
    and stops compiling (falling back to eager, silently) past ``recompile_limit`` of them, so one shared
    function would run SiT's ~15 parameter sizes half compiled."""
    key = (fn.__name__, *key)
    compiled = _KERNELS.get(key)
    if compiled is None:
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{len(_KERNELS)}")
        fresh = types.FunctionType(code, fn.__globals__, code.co_name)
        compiled = _KERNELS[key] = torch.compile(fresh, dynamic=False, fullgraph=True)
    return compiled


def _compile_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = []
    for mod, name in (("torch._dynamo.exc", "BackendCompilerFailed"), ("torch._inductor.exc", "InductorError")):
        try:
            errs.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errs)


class FusedUpdate:
    """Clipping, AdamW, the bf16 copy's refresh and the EMA of ``model``'s trained parameters in one kernel
    per tensor (see the module docstring).

    Args:
        opt: the run's AdamW (its hyper-parameters per group, its state); amsgrad and maximize unsupported.
        model: the fp32 model the optimizer steps (the master under bf16-compute).
        ema: the EMA of ``model``, or None.
        compute: the bf16 compute copy under bf16-compute (its gradients are the ones read), or None.

    Use: ``n = fu.grad_norm()`` after the backward (the clipping norm, a device tensor), then
    ``fu.step(n, max_norm, ema_beta)``; it leaves every gradient ``None``.
    """

    def __init__(self, opt: torch.optim.Optimizer, model: nn.Module, ema: EMA | None = None,
                 compute: Bf16Compute | None = None) -> None:
        if not isinstance(opt, torch.optim.AdamW):
            raise TypeError(f"FusedUpdate implements AdamW, got {type(opt).__name__}")
        for group in opt.param_groups:
            if group.get("amsgrad") or group.get("maximize") or not group.get("decoupled_weight_decay", True):
                raise ValueError("FusedUpdate implements plain AdamW (decoupled weight decay; no amsgrad, "
                                 "no maximize)")
        in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
        trained = [p for p in model.parameters() if p.requires_grad]
        missing = sum(id(p) not in in_opt for p in trained)
        if missing:
            raise ValueError(f"{missing} trained parameter(s) of the model are not in the optimizer")
        for p in trained:
            if not p.is_contiguous():
                raise ValueError(f"FusedUpdate needs contiguous parameters, got one of shape {tuple(p.shape)} "
                                 f"with strides {p.stride()}")
        self.opt, self.model, self.ema, self.compute = opt, model, ema, compute
        self._copy = {id(m): c for m, c in compute.trained} if compute is not None else {}
        self._ema = ({id(p): e for p, e in zip(model.parameters(), ema.module.parameters(), strict=True)}
                     if ema is not None else {})

    def _grad(self, p: Tensor) -> Tensor | None:
        c = self._copy.get(id(p))
        return p.grad if c is None else c.grad

    def _with_grads(self, params: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """(parameter, the gradient read for it) for those of ``params`` that got one."""
        pairs = [(p, self._grad(p)) for p in params]
        return [(p, g) for p, g in pairs if g is not None]

    @torch.no_grad()
    def grad_norm(self) -> Tensor:
        """‖g‖₂ over every gradient (the bf16 copy's under bf16-compute), accumulated in fp32, as a device
        tensor: the norm torch's ``clip_grad_norm_`` computes."""
        params = [p for group in self.opt.param_groups for p in group["params"]]
        grads = [g for _, g in self._with_grads(params)]
        if not grads:
            return torch.zeros((), device=next(self.model.parameters()).device)
        if all(g.dtype == torch.float32 for g in grads):
            return torch.nn.utils.get_total_norm(grads)  # what clip_grad_norm_ computes
        # bf16 (the compute copy's): torch's norms with dtype=float32 first cast each gradient to a new fp32
        # tensor (another write and read of 4 bytes per parameter); a compiled Σg² reads g once
        squares = [self._call(_compiled(_sum_of_squares, g.numel(), g.dtype, g.device), g.view(-1)) for g in grads]
        return torch.stack(squares).sum().sqrt()

    @staticmethod
    def _call(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except _compile_errors() as err:
            raise FusedUpdateError(
                f"optim.fused_update compiles its kernels with torch.compile, which failed ({err}); on CPU "
                "inductor needs a C++ compiler (g++). Set optim.fused_update=false to use the eager update.") from err

    def _state(self, p: Tensor) -> dict[str, Tensor]:
        st = self.opt.state[p]
        if not st:  # torch's AdamW state, as its first step makes it
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    @torch.no_grad()
    def step(self, grad_norm: Tensor, max_norm: float, ema_beta: float | None) -> None:
        """Clip by ``max_norm`` (``inf``: no clipping) given ``grad_norm`` from :meth:`grad_norm`, take the
        AdamW step, refresh the bf16 copy and move the EMA by ``ema_beta`` (None: leave the EMA alone).
        Parameters without a gradient are not stepped (as torch's AdamW); the EMA still moves toward them."""
        coef = (max_norm / (grad_norm.double() + 1e-6)).clamp(max=1.0)
        w = 0.0 if ema_beta is None else 1.0 - ema_beta
        done = set()
        for group in self.opt.param_groups:
            pairs = self._with_grads(group["params"])
            if not pairs:
                continue
            states = [self._state(p) for p, _ in pairs]
            counts = [st["step"] for st in states]
            torch._foreach_add_(counts, 1.0)
            k = torch.stack(counts).double()
            (b1, b2), lr, wd, eps = group["betas"], float(group["lr"]), group["weight_decay"], group["eps"]
            n, dev = len(pairs), k.device

            def full(x: float, n: int = n, dev: torch.device = dev) -> Tensor:
                return torch.full((n,), x, dtype=torch.float64, device=dev)

            cols = [coef.to(dev).expand(n), full(1 - lr * wd), full(1 - b1), full(b2), full(1 - b2), full(eps),
                    full(w), lr / (1 - torch.pow(b1, k)), torch.sqrt(1 - torch.pow(b2, k))]
            s = torch.zeros(n, _SCALARS, dtype=torch.float32, device=dev)
            s[:, :len(cols)] = torch.stack(cols, 1)
            rows = s.unbind(0)
            for (p, g), st, row in zip(pairs, states, rows, strict=True):
                e = self._ema.get(id(p)) if ema_beta is not None else None
                c = self._copy.get(id(p))
                args = (p.detach().view(-1), g.view(-1), st["exp_avg"].view(-1), st["exp_avg_sq"].view(-1),
                        row, None if e is None else e.view(-1), None if c is None else c.detach().view(-1))
                self._call(_compiled(_kernel, p.numel(), p.dtype, g.dtype, p.device, e is None, c is None), *args)
                if e is not None:
                    done.add(id(e))
        for p in self.model.parameters():
            p.grad = None
        if self.compute is not None:
            for _, c in self.compute.trained:
                c.grad = None
            self.compute.refresh_buffers()
        if self.ema is not None and ema_beta is not None:
            self.ema.apply(self.model, ema_beta, frozenset(done))
