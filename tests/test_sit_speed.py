"""The SiT speed work (issue 14) changes no numbers it does not say it changes.

* ``unpatchify`` (one permute instead of an einsum) is pure data movement: bit-equal to the einsum.
* The default attention (``attn_impl="sdpa"``) is bit-equal, outputs and gradients, to a plain
  re-implementation of the block with ``F.scaled_dot_product_attention`` on q, k, v = qkv[0], qkv[1], qkv[2].
* The opt-in ``attn_impl="matmul"`` is bit-equal to the three plain ops softmax((q/√d) kᵀ) v written out
  here (fp32 and under bf16 autocast), and in fp32 within the fp32 rounding bound of the fused kernel.
* Both implementations share one parameter layout, so checkpoints load into either.
* ``benchmarks/gpu_check.py --smoke`` runs end to end on CPU.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from deltafm.models import SiT, build_model
from deltafm.models.sit import SiTBlock, _modulate

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench(module: str) -> ModuleType:
    """A module of benchmarks/ (a folder of scripts, not a package), imported by name."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(BENCH))


def _perturbed(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give every parameter N(0, 0.05²) noise so no adaLN-Zero branch stays exactly zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def _plain_attention(attn: torch.nn.Module, x: torch.Tensor, matmul: bool) -> torch.Tensor:
    """softmax(q kᵀ/√d) v per head, written out with the module's weights."""
    b, n, d = x.shape
    h = attn.num_heads
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if matmul:
        out = torch.softmax(torch.matmul(q * (d // h) ** -0.5, k.transpose(-2, -1)), dim=-1).matmul(v)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return F.linear(out.transpose(1, 2).reshape(b, n, d), attn.proj.weight, attn.proj.bias)


def _plain_block(block: SiTBlock, x: torch.Tensor, c: torch.Tensor, matmul: bool) -> torch.Tensor:
    """The adaLN-Zero block of the SiT paper, op by op (see deltafm.models.sit)."""
    mod = F.linear(F.silu(c), block.adaLN_modulation[1].weight, block.adaLN_modulation[1].bias)
    s1, sc1, g1, s2, sc2, g2 = mod.chunk(6, dim=-1)
    ln = lambda z: F.layer_norm(z, z.shape[-1:], eps=1e-6)  # noqa: E731
    x = x + g1[:, None, :] * _plain_attention(block.attn, _modulate(ln(x), s1, sc1), matmul)
    h = F.gelu(F.linear(_modulate(ln(x), s2, sc2), block.mlp.fc1.weight, block.mlp.fc1.bias), approximate="tanh")
    return x + g2[:, None, :] * F.linear(h, block.mlp.fc2.weight, block.mlp.fc2.bias)


def _grads(fn, block: SiTBlock, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output of fn(x, c) and the gradients of Σ out² (fp32) w.r.t. x and every parameter."""
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out = fn(x, c)
    out.float().pow(2).sum().backward()
    return out.detach(), [x.grad, *(p.grad for p in block.parameters())]


@pytest.mark.parametrize("impl", ["sdpa", "matmul"])
@pytest.mark.parametrize("bf16", [False, True])
def test_block_equals_plain_reimplementation_bitwise(impl: str, bf16: bool) -> None:
    torch.manual_seed(0)
    block = _perturbed(SiTBlock(64, 4, attn_impl=impl))
    x, c = torch.randn(3, 16, 64), torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out, grads = _grads(block, block, x, c)
        ref_out, ref_grads = _grads(lambda a, b: _plain_block(block, a, b, impl == "matmul"), block, x, c)
    assert out.dtype == torch.float32  # the residual stream stays fp32 under autocast
    assert torch.equal(out, ref_out)
    for g, rg in zip(grads, ref_grads, strict=True):
        assert torch.equal(g, rg)


def test_matmul_attention_matches_sdpa_within_fp32_rounding() -> None:
    """Same formula, different summation order. First-order rounding analysis: each contraction of length
    n is accurate to n·u (u = 2⁻²⁴) relative to its scale; here there are four of length ≤ 64 (q kᵀ over
    d_head = 16, the softmax normaliser and P v over N = 64, the output projection over D = 64), so each
    implementation is within 4·64·u·max|out| of the exact value, and the two within twice that."""
    torch.manual_seed(0)
    sdpa = _perturbed(SiTBlock(64, 4, attn_impl="sdpa"))
    mm = SiTBlock(64, 4, attn_impl="matmul")
    mm.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 64, 64)
    a, b = sdpa.attn(x), mm.attn(x)
    bound = 2 * 4 * 64 * 2.0**-24 * float(a.detach().abs().max())
    assert float((a - b).abs().max()) <= bound


def test_both_attention_impls_share_parameters_and_default_is_sdpa() -> None:
    a = SiT(image_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    b = SiT(image_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10, attn_impl="matmul")
    assert a.blocks[0].attn.impl == "sdpa" and a.config["attn_impl"] == "sdpa"
    assert list(a.state_dict()) == list(b.state_dict())
    b.load_state_dict(a.state_dict(), strict=True)
    with pytest.raises(ValueError, match="attn_impl"):
        SiT(image_size=8, patch_size=2, hidden_size=64, depth=1, num_heads=4, num_classes=10, attn_impl="flash")


@pytest.mark.parametrize("image, patch, learn_sigma", [((8, 8), 2, False), ((8, 12), 4, True), ((6, 4), 1, False)])
def test_unpatchify_equals_einsum(image: tuple[int, int], patch: int, learn_sigma: bool) -> None:
    m = SiT(in_channels=3, image_size=image, patch_size=patch, hidden_size=32, depth=1, num_heads=2,
            num_classes=5, learn_sigma=learn_sigma)
    gh, gw, c = image[0] // patch, image[1] // patch, m.out_channels
    tok = torch.randn(2, gh * gw, patch * patch * c)
    plain = torch.einsum("nhwpqc->nchpwq", tok.reshape(2, gh, gw, patch, patch, c)).reshape(2, c, *image)
    assert torch.equal(m.unpatchify(tok), plain)


def test_sit_forward_and_grads_bitwise_equal_to_plain_blocks() -> None:
    """The whole model with its (default) blocks against the op-by-op blocks, fp32: outputs and grads."""
    torch.manual_seed(0)
    m = _perturbed(SiT(image_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10))
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 10])
    out = m(x, t, y)
    h = m.x_embedder(x).flatten(2).transpose(1, 2) + m.pos_embed
    c = m.t_embedder(t) + m.y_embedder(y)
    for blk in m.blocks:
        h = _plain_block(blk, h, c, matmul=False)
    assert torch.equal(out, m.unpatchify(m.final_layer(h, c)))


def test_gpu_check_smoke_runs_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    gpu_check = _bench("gpu_check")
    assert gpu_check.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    for word in ("train", "img/s", "MFU", "matmul", "peak memory", "host syncs"):
        assert word in out


def test_bench_reference_helpers() -> None:
    br = _bench("bench_reference")
    lo, hi = br.bootstrap_ci([1.0, 1.0, 1.0])
    assert lo == hi == 1.0
    v, u = torch.zeros(4, 2), torch.arange(8.0).reshape(4, 2)
    # with λ = 0 the loss is the plain mean squared error, whatever negatives are drawn
    assert torch.equal(br.dfm_loss(v, u, lam=0.0), u.pow(2).mean(1).mean())


def test_the_reference_source_is_read_from_a_file_a_checkout_or_a_git_dir(tmp_path) -> None:
    """bench_reference finds the reference's models/sit.py given the file, a checkout or a git directory (the
    lent GPU machine gets the file alone)."""
    import subprocess

    reference_source = _bench("bench_reference").reference_source
    (tmp_path / "co" / "models").mkdir(parents=True)
    sit = tmp_path / "co" / "models" / "sit.py"
    sit.write_text("X = 1\n")
    assert reference_source(str(sit)) == "X = 1\n" and reference_source(str(tmp_path / "co")) == "X = 1\n"
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "HOME": str(tmp_path), "PATH": os.environ["PATH"]}
    git = tmp_path / "g"
    for cmd in (["init", "-q", str(git)], ["-C", str(git), "add", "."], ["-C", str(git), "commit", "-qm", "x"]):
        if cmd[0] == "-C" and cmd[2] == "add":
            (git / "models").mkdir()
            (git / "models" / "sit.py").write_text("Y = 2\n")
        subprocess.run(["git", *cmd], check=True, env=env)
    (git / "models" / "sit.py").unlink()  # so only git show can read it
    assert reference_source(str(git / ".git")) == "Y = 2\n"
    with pytest.raises(FileNotFoundError, match="no reference"):
        reference_source(str(tmp_path / "missing"))


def test_the_device_script_parses_and_runs_the_gpu_check() -> None:
    import subprocess

    script = BENCH.parent / "scripts" / "device_gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "benchmarks/gpu_check.py" in text and "--mirror .ref/sit.py" in text and (BENCH / "gpu_check.py").is_file()


def test_the_harness_steps_a_bf16_compute_variant_on_its_fp32_master() -> None:
    """A ``+bf16c`` variant: AdamW steps the fp32 master and the bf16 copy is bf16(master) after the step."""
    from deltafm.train.bf16_compute import Bf16Compute

    br = _bench("bench_reference")
    torch.manual_seed(0)
    master = build_model("SiT-S/2", in_channels=4, image_size=8, num_classes=10, depth=1)
    bc = Bf16Compute(master)
    upd = br.Update(bc)
    assert upd.params == list(master.parameters()) and upd.opt.defaults["fused"] is True
    before = [p.detach().clone() for p in master.parameters()]
    br.train_step(bc, upd, torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), bf16=True)
    assert all(p.dtype == torch.float32 for p in master.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, master.parameters(), strict=True))
    for p, q in zip(master.parameters(), bc.compute.parameters(), strict=True):
        assert torch.equal(q, p.to(torch.bfloat16))


def test_the_harness_updates_each_side_as_its_training_loop_does() -> None:
    """``--step full``: the reference side steps torch's default AdamW and its per-parameter EMA stand-in,
    deltafm's side the fused AdamW and deltafm's EMA; from equal weights and gradients both EMAs hold
    β·e + (1 − β)·p (two implementations of one formula), and the two AdamWs agree within roundoff."""
    br = _bench("bench_reference")
    torch.manual_seed(0)
    a = build_model("SiT-S/2", in_channels=4, image_size=8, num_classes=10, depth=1)
    b = build_model("SiT-S/2", in_channels=4, image_size=8, num_classes=10, depth=1)
    b.load_state_dict(a.state_dict())
    c = build_model("SiT-S/2", in_channels=4, image_size=8, num_classes=10, depth=1)
    c.load_state_dict(a.state_dict())
    ra, rb, rc = br.Update(a, reference=True), br.Update(b), br.Update(c, fused_update=True)  # rc: "+fu"
    assert ra.opt.defaults["fused"] is None and rb.opt.defaults["fused"] is True and rb.ema is not None
    assert rc.fu is not None and rb.fu is None and br.Update(a, reference=True, fused_update=True).fu is None
    start = [p.detach().clone() for p in a.parameters()]
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        pa.grad = torch.randn_like(pa)
        pb.grad, pc.grad = pa.grad.clone(), pa.grad.clone()
    ra(2)
    rb(2)
    rc(2)
    for s, pa, pb, pc, ea, eb, ec in zip(start, a.parameters(), b.parameters(), c.parameters(), ra.ref_ema,
                                         rb.ema.module.parameters(), rc.ema.module.parameters(), strict=True):
        assert not torch.equal(pa, s)  # clipped, then stepped
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pc, pb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ea, 0.9999 * s + 1e-4 * pa.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(eb, ea, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ec, eb, rtol=1e-6, atol=1e-7)
    model_only = br.Update(a, full=False)
    assert model_only.ema is None and model_only.ref_ema is None and model_only.opt.defaults["fused"] is None


_FAKE_REFERENCE = '''
import torch.nn as nn
from timm.models.vision_transformer import Mlp


class SiT(nn.Module):
    """A stand-in for the reference's SiT with its constructor keywords and (v, zs) output."""

    def __init__(self, in_channels=4, **_):
        super().__init__()
        self.mlp = Mlp(in_channels, hidden_features=16)

    def forward(self, x, t, y):
        return self.mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), []
'''


@pytest.mark.slow  # four worker processes: about 28 s on 2 cores
def test_the_isolated_harness_runs_every_model_in_its_own_process(tmp_path, capsys) -> None:
    """``--isolate``: per round one worker process per model, each reporting its step, update and sampling
    times as a JSON line; the parent pairs them by round into the usual rows (here against a stand-in
    reference file, as on a machine without the reference's checkout)."""
    br = _bench("bench_reference")
    fake = tmp_path / "sit.py"
    fake.write_text(_FAKE_REFERENCE)
    assert br.main([str(fake), "--configs", "S", "--batch", "2", "--rounds", "2", "--isolate", "--precisions",
                    "bf16", "--variants", "sdpa+bf16c", "--nfe", "1", "--steps-per-round", "1",
                    "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for name in ("ref[sdpa]", "deltafm[sdpa+bf16c]"):
        assert out.count(f"bf16 {name}: step") == 2  # one worker process per round
        row = next(ln for ln in out.splitlines() if ln.startswith("| SiT-S/2 b2 | bf16 | " + name))
        step_ms, upd_ms = (float(c) for c in row.split("|")[4:6])
        assert 0 <= upd_ms < step_ms and (upd_ms > 0 or name.startswith("ref"))  # the stand-in is tiny
    assert "`--isolate`" in out and "fp32 |" not in out


@pytest.mark.slow  # six worker processes: about 45 s on 2 cores
def test_a_keep_variant_is_paired_against_the_same_variant_without_it(tmp_path, capsys) -> None:
    """``+keep``: the variant's workers keep freed memory (deltafm.train.allocator); the report pairs it per
    round against the same variant without ``+keep``."""
    br = _bench("bench_reference")
    fake = tmp_path / "sit.py"
    fake.write_text(_FAKE_REFERENCE)
    assert br.main([str(fake), "--configs", "S", "--batch", "2", "--rounds", "2", "--isolate", "--precisions",
                    "bf16", "--variants", "sdpa+bf16c,sdpa+bf16c+keep", "--steps-per-round", "1",
                    "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("bf16 deltafm[sdpa+bf16c+keep]: step") == 2
    assert "Paired, deltafm[sdpa+bf16c] / deltafm[sdpa+bf16c+keep] per round" in out


def test_the_harness_takes_mfu_against_the_higher_of_its_two_matmul_rates() -> None:
    """The report quotes the rates measured at the start and at the end of a run and takes MFU against the
    higher one: 3 · 1e9 FLOP in 1 s against 10 GFLOP/s (the end's, higher than the start's 5) is 30%."""
    br = _bench("bench_reference")
    row = dict(size="B", repa=False, batch=8, prec="bf16", name="ref[sdpa]", ms=1000.0, upd_ms=100.0, ratio=1.0,
               ci=(1.0, 1.0), flops=3e9, pairs=[])
    start, end = {"fp32": 2.0, "bf16": 5.0}, {"fp32": 3.0, "bf16": 10.0}
    text = br.report([row], start, ["MIRROR"], 0, end=end)
    assert "bf16 **10 GFLOP/s** (the higher of start and end: fp32 2 and 3, bf16 5 and 10)" in text
    assert "| SiT-B/2 b8 | bf16 | ref[sdpa] | 1000 | 100 | 1.000 (1.000–1.000) | 30% |" in text
