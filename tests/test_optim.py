"""The run's AdamW (deltafm.train.optim): the fused kernel on CPU, its update against AdamW's closed form and
torch's loop implementation, and a resume that keeps the config's implementation."""

from __future__ import annotations

import torch

from deltafm.train.config import OptimConfig
from deltafm.train.optim import build_adamw, restore_adamw

CPU = torch.device("cpu")


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(64, 33), (33,), (7, 3, 5)]]


def _grads(params: list[torch.nn.Parameter], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def test_fused_is_the_default_on_cpu_and_can_be_turned_off() -> None:
    assert build_adamw(_params(), OptimConfig(), CPU).defaults["fused"] is True
    assert build_adamw(_params(), OptimConfig(fused=False), CPU).defaults["fused"] is None
    # a device without the fused kernel in deltafm's list falls back to torch's choice
    assert build_adamw(_params(), OptimConfig(), torch.device("meta")).defaults["fused"] is None


def test_first_step_matches_the_closed_form() -> None:
    """Step 1: m̂ = g and v̂ = g², so p1 = p0 (1 − lr·wd) − lr · g / (|g| + eps)."""
    o = OptimConfig(lr=1e-2, weight_decay=0.1, eps=1e-3)
    params = _params()
    p0 = [p.detach().clone() for p in params]
    _grads(params, 1)
    build_adamw(params, o, CPU).step()
    for p, q in zip(params, p0, strict=True):
        want = q * (1 - o.lr * o.weight_decay) - o.lr * p.grad / (p.grad.abs() + o.eps)
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=2e-7)


def test_fused_agrees_with_the_loop_implementation() -> None:
    """Ten steps of the fused kernel and of torch's per-parameter loop stay within float32 roundoff."""
    o = OptimConfig(lr=1e-2, weight_decay=0.05)
    a, b = _params(), _params()
    oa, ob = build_adamw(a, o, CPU), build_adamw(b, OptimConfig(lr=o.lr, weight_decay=0.05, fused=False), CPU)
    for k in range(10):
        _grads(a, 10 + k)
        _grads(b, 10 + k)
        oa.step()
        ob.step()
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_resume_is_bit_exact_and_keeps_the_configs_implementation() -> None:
    """Saved by a loop AdamW, restored into a fused one: the group stays fused; and a fused run split by a
    save/restore equals the uninterrupted fused run bit for bit."""
    o = OptimConfig(lr=1e-2)
    loop = build_adamw(_params(), OptimConfig(lr=1e-2, fused=False), CPU)
    loop.param_groups[0]["params"][0].grad = torch.ones(64, 33)
    loop.step()
    fused = build_adamw(_params(), o, CPU)
    restore_adamw(fused, loop.state_dict())
    assert fused.param_groups[0]["fused"] is True and fused.param_groups[0]["foreach"] is None

    whole = _params()
    ow = build_adamw(whole, o, CPU)
    split = _params()
    os_ = build_adamw(split, o, CPU)
    for k in range(3):
        _grads(whole, k)
        ow.step()
        _grads(split, k)
        os_.step()
    saved = {"opt": os_.state_dict(), "w": [p.detach().clone() for p in split]}
    again = [torch.nn.Parameter(w.clone()) for w in saved["w"]]
    ro = build_adamw(again, o, CPU)
    restore_adamw(ro, saved["opt"])
    for k in range(3, 6):
        _grads(whole, k)
        ow.step()
        _grads(again, k)
        ro.step()
    for p, q in zip(whole, again, strict=True):
        assert torch.equal(p, q)
