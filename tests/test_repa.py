"""REPA: the alignment loss against a hand computation, token-grid resampling, the aligned model, and the
objective with and without REPA targets."""

from __future__ import annotations

import math

import pytest
import torch

import deltafm
from deltafm.alignment import AlignedModel, alignment_loss, build_projector, match_token_grid, square_grid
from deltafm.models.sit import SiT


def _hand_repa(projected, targets):
    """−cos averaged over encoders, samples and tokens, written as plain loops."""
    total, count = 0.0, 0
    for p, z in zip(projected, targets):
        for i in range(p.shape[0]):
            for n in range(p.shape[1]):
                a, b = p[i, n].double(), z[i, n].double()
                total += -float(a @ b) / (math.sqrt(float(a @ a)) * math.sqrt(float(b @ b)))
                count += 1
    return total / count


def test_alignment_loss_equals_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    p = [torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 7, generator=g)]
    z = [torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 7, generator=g)]
    assert alignment_loss(p, z).item() == pytest.approx(_hand_repa(p, z), abs=1e-6)
    per = alignment_loss(p, z, per_sample=True)
    assert per.shape == (3,) and per.mean().item() == pytest.approx(_hand_repa(p, z), abs=1e-6)
    # bounds: −1 when aligned (any positive scale), +1 when opposite
    assert alignment_loss([z[0] * 3.0], [z[0]]).item() == pytest.approx(-1.0, abs=1e-6)
    assert alignment_loss([-z[0]], [z[0]]).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="one target per projector"):
        alignment_loss(p, z[:1])
    with pytest.raises(ValueError, match="differ in shape"):
        alignment_loss([p[0]], [z[1]])


def test_token_grids_are_resampled_bilinearly_or_refused():
    t = torch.randn(2, 16, 3)
    assert match_token_grid(t, (4, 4)) is t
    # 2x2 -> 4x4, align_corners=False: sample positions −0.25, 0.25, 0.75, 1.25 clamp to 0, 0.25, 0.75, 1
    a = torch.tensor([[0.0, 1.0], [2.0, 3.0]])  # value = 2·row + col
    tok = a.reshape(1, 4, 1)
    out = match_token_grid(tok, (4, 4)).reshape(4, 4)
    w = torch.tensor([0.0, 0.25, 0.75, 1.0])
    assert torch.allclose(out, 2 * w[:, None] + w[None, :])
    assert match_token_grid(torch.randn(2, 49, 5), (4, 4)).shape == (2, 16, 5)
    assert square_grid(49) == 7
    with pytest.raises(ValueError, match="square grid"):
        match_token_grid(torch.randn(2, 12, 3), (4, 4))


def _sit(depth=3, **kw):
    torch.manual_seed(0)
    return SiT(in_channels=2, image_size=8, patch_size=2, hidden_size=32, depth=depth, num_heads=2,
               num_classes=3, **kw)


def test_aligned_model_is_the_backbone_plus_projectors_on_block_k():
    sit = _sit()
    for p in sit.parameters():  # a non-trivial backbone (adaLN-Zero would make every block the identity)
        torch.nn.init.normal_(p, std=0.05)
    model = AlignedModel(sit, [5, 7], encoder_depth=2, projector_dim=16)
    x, t, c = torch.randn(4, 2, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 3])
    v = model(x, t, c)
    assert torch.equal(v, sit(x, t, c))
    v2, zs = model(x, t, c, align=True)
    assert torch.equal(v2, v) and [z.shape for z in zs] == [(4, 16, 5), (4, 16, 7)]
    _, (h,) = sit(x, t, c, return_features=[1])
    assert torch.equal(zs[1], model.projectors[1](h))
    proj = build_projector(32, 16, 5)
    assert [type(m).__name__ for m in proj] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert model.grid == (4, 4) and model.null_class == 3 and model.image_size == (8, 8)
    with pytest.raises(ValueError, match="encoder_depth"):
        AlignedModel(sit, [5], encoder_depth=4)
    with pytest.raises(ValueError, match="SiT"):
        AlignedModel(torch.nn.Linear(2, 2), [5])


@pytest.mark.parametrize("lam,negatives", [(0.0, "none"), (0.1, "uniform"), (0.2, "different_class")])
def test_objective_adds_exactly_coeff_times_repa_and_leaves_the_rest_unchanged(lam, negatives):
    sit = _sit()
    for p in sit.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model = AlignedModel(sit, [6], encoder_depth=3, projector_dim=8)
    x, y = torch.randn(6, 2, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    z = [torch.randn(6, 16, 6)]
    obj = deltafm.DeltaFMObjective(lam=lam, negatives=negatives, num_classes=3, label_dropout=0.3, align_coeff=0.5)
    plain = obj(sit, x, y, generator=torch.Generator().manual_seed(3))
    rep = obj(model, x, y, generator=torch.Generator().manual_seed(3), align_targets=z)
    # same draws (t, noise, dropout, negatives) and the same velocity loss
    assert torch.equal(plain.sample.t, rep.sample.t) and torch.equal(plain.cond, rep.cond)
    for k in ("positive", "negative"):
        assert torch.equal(plain.parts[k], rep.parts[k])
    _, (h,) = sit(rep.sample.x_t, rep.sample.t, rep.cond, return_features=[2])
    want = _hand_repa([model.projectors[0](h).detach()], z)
    assert rep.parts["repa"].item() == pytest.approx(want, abs=1e-6)
    assert torch.equal(rep.loss.detach(), plain.loss.detach() + 0.5 * rep.parts["repa"])
    assert "repa" not in plain.parts
    # gradients: the backbone's equal those of (velocity loss + 0.5·REPA)
    rep.loss.backward()
    assert model.projectors[0][0].weight.grad is not None and sit.blocks[0].attn.qkv.weight.grad is not None
    assert sit.blocks[2].mlp.fc1.weight.grad.abs().sum() > 0


def test_without_targets_the_objective_is_bit_identical_to_plain_deltafm():
    sit = _sit()
    for p in sit.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, y = torch.randn(6, 2, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    grads = []
    for coeff in (0.0, 0.5):
        sit.zero_grad()
        obj = deltafm.DeltaFMObjective(lam=0.1, num_classes=3, label_dropout=0.2, align_coeff=coeff)
        out = obj(AlignedModel(sit, [4], encoder_depth=1), x, y, generator=torch.Generator().manual_seed(1))
        out.loss.backward()
        grads.append((out.loss.detach(), [p.grad.clone() for p in sit.parameters()]))
    ref = deltafm.DeltaFMObjective(lam=0.1, num_classes=3, label_dropout=0.2)
    sit.zero_grad()
    out = ref(sit, x, y, generator=torch.Generator().manual_seed(1))
    out.loss.backward()
    for loss, g in grads:
        assert torch.equal(loss, out.loss.detach())
        assert all(torch.equal(a, p.grad) for a, p in zip(g, sit.parameters()))
    with pytest.raises(ValueError, match="align_coeff"):
        deltafm.DeltaFMObjective(label_dropout=0.0, align_coeff=-1.0)
