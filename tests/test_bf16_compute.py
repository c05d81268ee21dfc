"""train.precision=bf16-compute: a bf16 copy runs forward and backward, fp32 master weights are stepped.

Exact properties (the copy is bf16(master) after every refresh; the master's gradient is exactly the fp32
cast of the copy's), numerics against fp32 within the error autocast itself makes, a resumed run that ends
bit-identical to an uninterrupted one, and checkpoints that hold fp32 weights."""

from __future__ import annotations

import json

import pytest
import torch

from deltafm.models import build_model
from deltafm.train.bf16_compute import Bf16Compute
from deltafm.train.checkpoint import load_checkpoint
from deltafm.train.config import find_preset, load_config
from deltafm.train.loop import train

FAST = ["log.progress_bar=false", "log.tensorboard=false", "train.threads=1"]
EPS_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significand bits)


def _sit() -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model("SiT-S/2", in_channels=4, image_size=8, num_classes=10, depth=2)
    with torch.no_grad():  # SiT's adaLN-zero init makes the output 0; perturb so every path carries signal
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 4, 8, 8, generator=g), torch.rand(4, generator=g), torch.randint(0, 10, (4,), generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_the_copy_is_bf16_of_the_master_and_gradients_are_cast_exactly():
    m = _sit()
    bc = Bf16Compute(m)
    assert list(bc.parameters()) == list(bc.compute.parameters())  # the master is not a submodule
    for p, q in zip(m.parameters(), bc.compute.parameters(), strict=True):
        assert q.dtype == torch.bfloat16 and torch.equal(q, p.to(torch.bfloat16))
    x, t, y = _inputs()
    out = bc(x, t, y)
    assert out.dtype == torch.float32
    out.square().mean().backward()
    copy_grads = [q.grad.clone() for q in bc.compute.parameters()]
    assert all(p.grad is None for p in m.parameters())
    bc.grads_to_master()
    for p, q, g in zip(m.parameters(), bc.compute.parameters(), copy_grads, strict=True):
        assert p.grad.dtype == torch.float32 and torch.equal(p.grad, g.float()) and q.grad is None
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    bc.refresh()
    for p, q in zip(m.parameters(), bc.compute.parameters(), strict=True):
        assert torch.equal(q, p.to(torch.bfloat16))


def test_outputs_and_gradients_are_within_autocasts_own_bf16_error():
    """Both bf16 modes against fp32: bf16-compute's error is of the size autocast's is (both a few bf16
    roundoffs), not a different regime."""
    x, t, y = _inputs()
    ref = _sit()
    v32 = ref(x, t, y)
    v32.square().mean().backward()
    g32 = torch.cat([p.grad.flatten() for p in ref.parameters()])

    auto = _sit()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        va = auto(x, t, y)
    va.float().square().mean().backward()
    ga = torch.cat([p.grad.flatten() for p in auto.parameters()])

    m = _sit()
    bc = Bf16Compute(m)
    vb = bc(x, t, y)
    vb.square().mean().backward()
    bc.grads_to_master()
    gb = torch.cat([p.grad.flatten() for p in m.parameters()])

    err_auto, err_bc = _rel(va.float(), v32), _rel(vb, v32)
    gerr_auto, gerr_bc = _rel(ga, g32), _rel(gb, g32)
    assert 0 < err_auto < 8 * EPS_BF16 and 0 < err_bc < 8 * EPS_BF16, (err_auto, err_bc)
    assert 0 < gerr_auto < 8 * EPS_BF16 and 0 < gerr_bc < 8 * EPS_BF16, (gerr_auto, gerr_bc)
    assert err_bc < 4 * err_auto and gerr_bc < 4 * gerr_auto, (err_auto, err_bc, gerr_auto, gerr_bc)
    print(f"relative error against fp32: output autocast {err_auto:.2e} bf16-compute {err_bc:.2e}; "
          f"gradients {gerr_auto:.2e} {gerr_bc:.2e}")


def _cfg(*overrides: str):
    return load_config(find_preset("digits-tiny"), [*FAST, "train.precision=bf16-compute", "train.ckpt_every=2",
                                                   "log.every=1", *overrides])


def _train(cfg, out, resume=None):
    with torch.random.fork_rng(devices=[]):
        return train(cfg, out, resume=resume)


@pytest.mark.parametrize("accum", [1, 2])
def test_a_bf16_compute_run_resumes_bit_exactly_and_saves_fp32_weights(tmp_path, accum):
    whole = _train(_cfg("train.steps=4", f"train.grad_accum={accum}"), tmp_path / "whole")
    assert whole.status == "done" and whole.step == 4
    half = _train(_cfg("train.steps=2", f"train.grad_accum={accum}"), tmp_path / "split")
    assert half.step == 2
    rest = _train(_cfg("train.steps=4", f"train.grad_accum={accum}"), tmp_path / "split", resume="auto")
    assert rest.step == 4
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "step_00000004")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "step_00000004")
    assert all(v.dtype == torch.float32 for v in a.model.values() if v.is_floating_point())
    for k, v in a.model.items():
        assert torch.equal(v, b.model[k]), k
    for k, v in a.ema.items():
        assert torch.equal(v, b.ema[k]), k
    # it did not silently train in fp32: the same run in fp32 ends with other weights
    fp32 = _train(_cfg("train.steps=4", f"train.grad_accum={accum}", "train.precision=fp32"), tmp_path / "fp32")
    assert fp32.step == 4
    c = load_checkpoint(tmp_path / "fp32" / "checkpoints" / "step_00000004")
    differs = [k for k, v in a.model.items() if v.is_floating_point() and not torch.equal(v, c.model[k])]
    assert differs


def test_sampling_through_a_bf16_compute_copy(tmp_path):
    """``deltafm sample --amp bf16-compute``: deterministic, and as close to fp32 sampling as autocast bf16."""
    import numpy as np

    from deltafm.cli import main as cli

    res = _train(_cfg("train.steps=2", "train.precision=fp32"), tmp_path / "run")
    assert res.step == 2

    def sample(name: str, amp: str) -> np.ndarray:
        rc = cli(["sample", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / name), "--no-progress",
                  "--threads", "1", "--steps", "4", "--num", "20", "--seed", "3", "--amp", amp])
        assert rc == 0
        with np.load(tmp_path / name / "samples.npz") as z:
            return z["arr_0"].astype(np.int16)

    fp32, auto, bc, bc2 = sample("fp32", "none"), sample("auto", "bf16"), sample("bc", "bf16-compute"), sample(
        "bc2", "bf16-compute")
    assert np.array_equal(bc, bc2)
    d_auto, d_bc = np.abs(auto - fp32).mean(), np.abs(bc - fp32).mean()
    assert d_bc > 0  # it did run in bf16
    assert d_bc <= 4 * d_auto + 1.0, (d_auto, d_bc)  # uint8 levels


@pytest.mark.slow
def test_sampling_through_a_compiled_model(tmp_path):
    """``deltafm sample --compile`` (with and without the bf16 copy): the samples are eager's up to roundoff,
    and sample.json records it (as do the work folder's settings, which a resume must match)."""
    import numpy as np

    from deltafm.cli import main as cli

    res = _train(_cfg("train.steps=2", "train.precision=fp32"), tmp_path / "run")
    assert res.step == 2

    def sample(name: str, *extra: str) -> np.ndarray:
        rc = cli(["sample", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / name), "--no-progress",
                  "--threads", "1", "--steps", "4", "--num", "20", "--seed", "3", *extra])
        assert rc == 0
        with np.load(tmp_path / name / "samples.npz") as z:
            return z["arr_0"].astype(np.int16)

    eager, compiled = sample("eager"), sample("compiled", "--compile")
    assert np.abs(compiled - eager).max() <= 1  # uint8 levels: fp32 roundoff at most flips a rounding
    bc, bcc = sample("bc", "--amp", "bf16-compute"), sample("bcc", "--amp", "bf16-compute", "--compile")
    assert np.abs(bcc - eager).mean() <= 4 * np.abs(bc - eager).mean() + 1.0
    settings = json.loads((tmp_path / "compiled" / "sample.json").read_text())
    assert settings.get("compile") is True, settings
