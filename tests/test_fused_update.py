"""optim.fused_update (deltafm.train.fused_update): clipping, AdamW, the bf16 copy and the EMA in one kernel.

Against AdamW's closed form on the first step, against the eager path (torch's clip_grad_norm_, its fused
AdamW, Bf16Compute.refresh, EMA.update) over several steps within fp32 roundoff, with torch's AdamW state in
both directions, and in the training loop: a split run equal bit for bit to an uninterrupted one (marked slow:
``.venv/bin/python -m pytest -q -m slow tests/test_fused_update.py``). Kernels compile at their first use (a few
seconds per parameter size; cached on disk after). tests/test_sync.py runs the loop with it in the default suite."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from deltafm.train.bf16_compute import Bf16Compute
from deltafm.train.checkpoint import load_checkpoint
from deltafm.train.config import ConfigError, find_preset, load_config
from deltafm.train.ema import EMA
from deltafm.train.fused_update import FusedUpdate
from deltafm.train.loop import train

FAST = ["log.progress_bar=false", "log.tensorboard=false", "train.threads=1"]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))  # sizes 30, 5, 15, 3


def _set_grads(targets: list[nn.Parameter], seed: int, scale: float = 1.0, skip: int | None = None) -> None:
    g = torch.Generator().manual_seed(seed)
    for i, p in enumerate(targets):
        p.grad = None if i == skip else (scale * torch.randn(p.shape, generator=g)).to(p.dtype)


def test_the_first_step_is_adamw_in_closed_form_with_clipping_ema_and_copy():
    """k = 1: m̂ = ĝ and sqrt(v̂) = |ĝ|, so θ₁ = θ₀(1 − lr·wd) − lr·ĝ/(|ĝ| + eps) with ĝ = c·g,
    c = max_norm / (‖g‖ + 1e-6); θ̄₁ = θ̄₀ + (1 − β)(θ₁ − θ̄₀); the copy is bf16(θ₁)."""
    net = _net()
    bc, ema = Bf16Compute(net), EMA(net, decay=0.9)
    with torch.no_grad():
        for e in ema.module.parameters():
            e.add_(0.5)  # an EMA away from the weights, so its step is visible
    e0 = [e.detach().clone() for e in ema.module.parameters()]
    p0 = [p.detach().clone() for p in net.parameters()]
    lr, wd, eps, max_norm = 1e-2, 0.1, 1e-8, 0.5
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd, eps=eps)
    fu = FusedUpdate(opt, net, ema, bc)
    _set_grads([c for _, c in bc.trained], seed=1)
    g = [c.grad.float() for _, c in bc.trained]
    norm = fu.grad_norm()
    assert norm.item() == pytest.approx(torch.cat([x.flatten() for x in g]).norm().item(), rel=1e-6)
    fu.step(norm, max_norm, 0.9)
    c = max_norm / (norm.item() + 1e-6)
    assert c < 1  # clipping is active
    for p, a, e, ea, (_, cp), gi in zip(net.parameters(), p0, ema.module.parameters(), e0, bc.trained, g):
        gh = c * gi
        want = a * (1 - lr * wd) - lr * gh / (gh.abs() + eps)
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(e, ea + 0.1 * (p.detach() - ea), rtol=1e-6, atol=1e-7)
        assert torch.equal(cp.detach(), p.detach().to(torch.bfloat16))
        st = opt.state[p]
        assert st["step"].item() == 1
        torch.testing.assert_close(st["exp_avg"], 0.1 * gh, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(st["exp_avg_sq"], 0.001 * gh * gh, rtol=1e-5, atol=1e-12)
    assert all(p.grad is None for p in net.parameters()) and all(cp.grad is None for _, cp in bc.trained)


def _eager_step(net, bc, opt, ema, max_norm, images):
    if bc is not None:
        bc.grads_to_master()
    n = torch.nn.utils.clip_grad_norm_(list(net.parameters()), max_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if bc is not None:
        bc.refresh()
    ema.update(net, 8, images)
    return n


@pytest.mark.parametrize("bf16_copy", [False, True])
def test_it_agrees_with_the_eager_update_and_shares_its_optimizer_state(bf16_copy):
    """Six steps (clipping on in some, off in others; one step with a parameter that got no gradient): the
    fused update and the eager path stay within fp32 roundoff; midway each continues from the other's
    AdamW state, so checkpoints of either kind resume under the other."""
    ref = _net()
    runs = []
    for _ in range(2):
        net = copy.deepcopy(ref)
        bc = Bf16Compute(net) if bf16_copy else None
        opt = torch.optim.AdamW(net.parameters(), lr=3e-2, weight_decay=0.05, fused=True)
        ema = EMA(net, decay=None, halflife_images=16)
        runs.append([net, bc, opt, ema])
    fu = FusedUpdate(runs[1][2], runs[1][0], runs[1][3], runs[1][1])
    for step in range(6):
        scale, skip = (0.01 if step % 2 else 10.0), (2 if step == 3 else None)
        norms = []
        for i, (net, bc, opt, ema) in enumerate(runs):
            targets = [c for _, c in bc.trained] if bc is not None else list(net.parameters())
            _set_grads(targets, seed=step, scale=scale, skip=skip)
            if i == 0:
                norms.append(_eager_step(net, bc, opt, ema, 1.0, 8 * (step + 1)))
            else:
                n = fu.grad_norm()
                fu.step(n, 1.0, ema.beta(8, 8 * (step + 1)))
                norms.append(n)
        assert norms[0].item() == pytest.approx(norms[1].item(), rel=1e-6)
        (a, abc, aopt, aema), (b, bbc, bopt, bema) = runs
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
            assert aopt.state[p]["step"].item() == bopt.state[q]["step"].item()
            torch.testing.assert_close(bopt.state[q]["exp_avg_sq"], aopt.state[p]["exp_avg_sq"], rtol=1e-5, atol=0)
        for p, q in zip(aema.module.parameters(), bema.module.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        if bf16_copy:
            for mq, q in bbc.trained:
                assert torch.equal(q, mq.detach().to(torch.bfloat16))  # the copy is exactly bf16(master)
        if step == 2:  # swap the AdamW states: each side continues from the other's
            sa, sb = aopt.state_dict(), bopt.state_dict()
            aopt.load_state_dict(sb)
            bopt.load_state_dict(sa)
    # the parameter without a gradient at step 3 was not stepped then (torch's AdamW skips it too)
    assert runs[1][2].state[list(runs[1][0].parameters())[2]]["step"].item() == 5


def test_it_rejects_what_it_does_not_implement():
    net = _net()
    with pytest.raises(TypeError, match="AdamW"):
        FusedUpdate(torch.optim.SGD(net.parameters(), lr=0.1), net)
    with pytest.raises(ValueError, match="amsgrad"):
        FusedUpdate(torch.optim.AdamW(net.parameters(), amsgrad=True), net)
    with pytest.raises(ValueError, match="not in the optimizer"):
        FusedUpdate(torch.optim.AdamW(list(net.parameters())[:2]), net)
    with pytest.raises(ConfigError, match="optim.fused_update"):
        load_config(find_preset("digits-tiny"), [*FAST, "optim.fused_update=true", "train.precision=fp16"])


def _cfg(*overrides: str):
    # a one-block SiT: few distinct parameter sizes, so few kernels to compile
    return load_config(find_preset("digits-tiny"), [
        *FAST, "model.name=SiT-S/2", "model.kwargs.depth=1", "train.ckpt_every=2", "log.every=1",
        "optim.fused_update=true", *overrides])


def _train(cfg, out, resume=None):
    with torch.random.fork_rng(devices=[]):
        return train(cfg, out, resume=resume)


@pytest.mark.slow  # compiles a SiT's kernels and trains four times: about 30 s per case on 2 cores
@pytest.mark.parametrize("precision", ["fp32", "bf16-compute"])
def test_a_fused_update_run_resumes_bit_exactly_and_tracks_the_eager_run(tmp_path, precision):
    whole = _train(_cfg("train.steps=4", f"train.precision={precision}"), tmp_path / "whole")
    assert whole.status == "done" and whole.step == 4
    _train(_cfg("train.steps=2", f"train.precision={precision}"), tmp_path / "split")
    rest = _train(_cfg("train.steps=4", f"train.precision={precision}"), tmp_path / "split", resume="auto")
    assert rest.step == 4
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "step_00000004")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "step_00000004")
    for k, v in a.model.items():
        assert torch.equal(v, b.model[k]), k
    for k, v in a.ema.items():
        assert torch.equal(v, b.ema[k]), k
    if precision != "fp32":
        return  # (in bf16 a weight on a rounding boundary of its bf16 copy sends the two runs apart)
    # the eager update from the same start ends within fp32 roundoff of it (4 steps of lr 2e-3)
    _train(_cfg("train.steps=4", f"train.precision={precision}", "optim.fused_update=false"), tmp_path / "eager")
    c = load_checkpoint(tmp_path / "eager" / "checkpoints" / "step_00000004")
    for k, v in a.model.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, c.model[k], rtol=1e-4, atol=1e-5)
    for k, v in a.ema.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, c.ema[k], rtol=1e-4, atol=1e-5)
