"""Conditioning on a text or several named conditions: dropout to the null, guidance, the objective, SiT.

The class-id path is the reference: a multi-condition with a single class part must give bit-identical
losses, velocities and samples to plain class ids (same draws in the same order, same tables).
"""

from __future__ import annotations

import pytest
import torch

from deltafm.conditioning import (
    Labels,
    MultiCond,
    TextCond,
    batch_size,
    cat_conds,
    class_ids,
    cond_to,
    drop_condition,
    null_condition,
    null_mask,
    select,
    without,
)
from deltafm.correction import MeanTarget
from deltafm.generate import generate
from deltafm.guidance import GuidedVelocity, cfg_combine
from deltafm.models.sit import SiT
from deltafm.objective import DeltaFMObjective

K = 5


def _text(b: int = 6, n: int = 4, d: int = 3, p: int = 2, seed: int = 0) -> TextCond:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    mask = torch.arange(n)[None] < lengths[:, None]
    return TextCond.from_features(torch.randn(b, n, d, generator=g), mask, torch.randn(b, p, generator=g))


def _multi(b: int = 6, seed: int = 0) -> MultiCond:
    g = torch.Generator().manual_seed(seed)
    return MultiCond({"shape": Labels(torch.randint(0, 4, (b,), generator=g), 4),
                      "colour": Labels(torch.randint(0, 3, (b,), generator=g), 3)})


def _sit(**kw) -> SiT:
    torch.manual_seed(0)
    model = SiT(in_channels=1, image_size=8, patch_size=4, hidden_size=32, depth=2, num_heads=2, **kw)
    for p in model.parameters():  # leave adaLN-Zero so the output depends on the condition
        torch.nn.init.normal_(p, std=0.1)
    return model


def test_text_dropout_yields_the_null_condition_with_the_class_draws() -> None:
    text = _text(b=64)
    out, dropped = drop_condition(text, 0.3, generator=torch.Generator().manual_seed(7))
    expected = torch.rand(64, generator=torch.Generator().manual_seed(7)) < 0.3
    assert torch.equal(out.null, expected) and torch.equal(dropped, expected)
    assert 0 < int(expected.sum()) < 64
    assert torch.equal(out.tokens, text.tokens) and torch.equal(out.mask, text.mask)


def test_multi_dropout_is_per_part_then_joint_in_order() -> None:
    cond = _multi(b=200)
    out, dropped = drop_condition(cond, {"shape": 0.2, "colour": 0.5}, joint=0.1,
                                  generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    d_shape, d_colour, d_all = (torch.rand(200, generator=g) < p for p in (0.2, 0.5, 0.1))
    assert torch.equal(out["shape"].null, d_shape | d_all)
    assert torch.equal(out["colour"].null, d_colour | d_all)
    assert torch.equal(dropped, (d_shape & d_colour) | d_all)
    kept = ~(d_shape | d_all)
    assert torch.equal(out["shape"].ids[kept], cond["shape"].ids[kept])
    assert bool((out["shape"].ids[~kept] == 4).all())


def test_select_cat_to_and_null_are_consistent() -> None:
    for cond in (_text(), _multi()):
        idx = torch.tensor([4, 0, 2])
        part = select(cond, idx)
        assert batch_size(part) == 3
        both = cat_conds([select(cond, slice(0, 2)), select(cond, slice(2, 6))])
        assert torch.equal(null_mask(both), null_mask(cond))
        assert torch.equal(null_mask(null_condition(cond)), torch.ones(6, dtype=torch.bool))
        moved = cond_to(cond, "cpu")
        assert batch_size(moved) == 6
    m = without(_multi(), "colour")
    assert bool(m["colour"].null.all()) and not bool(m["shape"].null.any())
    assert torch.equal(class_ids(_multi(), "shape"), _multi()["shape"].ids)
    assert class_ids(_text()) is None


def test_bad_conditions_are_refused() -> None:
    with pytest.raises(ValueError, match="same batch size"):
        MultiCond({"a": Labels(torch.zeros(2, dtype=torch.long), 2), "b": Labels(torch.zeros(3, dtype=torch.long), 2)})
    with pytest.raises(ValueError, match="mask"):
        TextCond(torch.zeros(2, 3, 4), torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, 1),
                 torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown condition"):
        drop_condition(_multi(), {"size": 0.1})
    with pytest.raises(ValueError, match="\\[0, 1\\)"):
        drop_condition(_text(), 1.0)
    with pytest.raises(ValueError, match="text has no class ids"):
        DeltaFMObjective(conditioning="text", negatives="different_class", num_classes=3)
    with pytest.raises(ValueError, match="contrast_on"):
        DeltaFMObjective(conditioning="multi", negatives="different_class", num_classes=4)
    obj = DeltaFMObjective(num_classes=K)
    with pytest.raises(ValueError, match="class conditioning"):
        obj(lambda x, t, c: x, torch.zeros(6, 1, 8, 8), _text())
    with pytest.raises(ValueError, match="needs a MultiCond"):
        _sit(conditions={"shape": 4})(torch.zeros(2, 1, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long))


def _as_multi(model_class: SiT) -> SiT:
    """A multi-condition SiT with one part "class" and the class model's exact weights."""
    multi = _sit(conditions={"class": K})
    state = dict(model_class.state_dict())
    state["y_embedder.tables.class.table.weight"] = state.pop("y_embedder.table.weight")
    multi.load_state_dict(state)
    return multi


def test_single_part_multi_condition_is_bit_identical_to_class_ids() -> None:
    """Objective (dropout draws, negatives, ū tracking), SiT and CFG sampling agree bit for bit."""
    model_c = _sit(num_classes=K)
    model_m = _as_multi(model_c)
    x1 = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % K
    obj_c = DeltaFMObjective(num_classes=K, label_dropout=0.3, negatives="different_class", lam=0.1)
    obj_m = DeltaFMObjective(num_classes=K, label_dropout=0.3, negatives="different_class", lam=0.1,
                             conditioning="multi", contrast_on="class")
    out_c = obj_c(model_c, x1, y, generator=torch.Generator().manual_seed(5))
    out_m = obj_m(model_m, x1, MultiCond({"class": Labels(y, K)}), generator=torch.Generator().manual_seed(5))
    assert out_c.loss.item() == out_m.loss.item()
    assert torch.equal(out_c.pred, out_m.pred) and torch.equal(out_c.neg_index, out_m.neg_index)
    assert torch.equal(out_c.dropped, out_m.dropped) and 0 < int(out_c.dropped.sum()) < 8
    assert torch.equal(obj_c.mean_target.sum_x1, obj_m.mean_target.sum_x1)
    corr_c = obj_c.sampling_correction("to_fm")
    corr_m = obj_m.sampling_correction("to_fm")
    common = dict(shape=(1, 8, 8), solver="euler", steps=3, seed=2, batch_size=4)
    s_c = generate(model_c, labels=y, num_classes=K, cfg=2.0, correction=corr_c, **common)
    s_m = generate(model_m, labels=MultiCond({"class": Labels(y, K)}), num_classes=None, cfg={"class": 2.0},
                   correction=corr_m, **common)
    s_j = generate(model_m, labels=MultiCond({"class": Labels(y, K)}), num_classes=None, cfg=2.0,
                   correction=corr_m, **common)
    assert torch.equal(s_c, s_j)
    # v_c + (w − 1)(v_c − v_u) is v_u + w (v_c − v_u) in another order of operations: equal up to rounding
    torch.testing.assert_close(s_m, s_c, rtol=1e-5, atol=1e-5)


def test_compositional_guidance_is_the_leave_one_out_sum() -> None:
    model = _sit(conditions={"shape": 4, "colour": 3})
    cond = _multi(b=4)
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 0.4)
    w = {"shape": 3.0, "colour": 1.5}
    vel = GuidedVelocity(model, cond, scale=w)
    got = vel(x, t)
    with torch.no_grad():
        v_c = model(x, t, cond)
        v_s = model(x, t, without(cond, "shape"))
        v_k = model(x, t, without(cond, "colour"))
    want = v_c + 2.0 * (v_c - v_s) + 0.5 * (v_c - v_k)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # one batch of 3 vs three calls: rounding
    assert vel.forward_passes == 3
    joint = GuidedVelocity(model, cond, scale=2.5)(x, t)
    with torch.no_grad():
        v_u = model(x, t, null_condition(cond))
    torch.testing.assert_close(joint, cfg_combine(v_c, v_u, 2.5), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown condition"):
        GuidedVelocity(model, cond, scale={"size": 2.0})


class _TextModel(torch.nn.Module):
    """v = a·x + (pooled · w) per sample, a learned null pooled for null rows."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.5))
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        self.null_pooled = torch.nn.Parameter(torch.tensor([3.0, 0.0]))

    def forward(self, x, t, cond: TextCond):
        pooled = torch.where(cond.null[:, None], self.null_pooled.expand_as(cond.pooled), cond.pooled)
        return self.a * x + (pooled @ self.w).reshape(-1, 1, 1, 1)


def test_text_objective_drops_contrasts_and_corrects() -> None:
    model = _TextModel()
    text = _text(b=8)
    x1 = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    obj = DeltaFMObjective(conditioning="text", label_dropout=0.4, lam=0.2, contrast_unconditional=False)
    out = obj(model, x1, text, generator=torch.Generator().manual_seed(9))
    assert torch.equal(out.cond.null, out.dropped) and 0 < int(out.dropped.sum()) < 8
    # hand computation of the loss with the objective's own draws
    u, v, j = out.sample.u, out.pred.detach(), out.neg_index
    pos = ((v - u) ** 2).flatten(1).mean(1)
    neg = ((v - u[j]) ** 2).flatten(1).mean(1)
    per = torch.where(out.dropped, pos, pos - 0.2 * neg)
    torch.testing.assert_close(out.loss.detach(), per.mean(), rtol=1e-6, atol=0)
    out.loss.backward()
    assert model.null_pooled.grad is not None and float(model.null_pooled.grad.abs().sum()) > 0
    corr = obj.sampling_correction("to_fm")
    t = torch.full((8,), 0.5)
    vv = torch.randn(8, 1, 2, 2)
    m1, m0 = obj.mean_target.means()
    ubar = (m1 - m0).float().reshape(1, 1, 2, 2)  # linear path: ū = α̇ m1 + σ̇ m0 = m1 − m0
    got = corr(vv, t, out.cond)
    keep = out.cond.null.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(got, torch.where(keep, vv, 0.8 * vv + 0.2 * ubar))


def test_correction_reads_the_contrast_part() -> None:
    mt = MeanTarget(3)
    g = torch.Generator().manual_seed(0)
    mt.update(torch.randn(30, 2, generator=g), torch.randn(30, 2, generator=g), torch.arange(30) % 3)
    obj = DeltaFMObjective(conditioning="multi", contrast_on="colour", num_classes=3,
                           negatives="different_class", lam=0.1)
    obj.mean_target = mt
    corr = obj.sampling_correction("to_fm")
    cond = _multi(b=6)
    v, t = torch.randn(6, 2), torch.rand(6)
    plain = DeltaFMObjective(num_classes=3, negatives="different_class", lam=0.1)
    plain.mean_target = mt
    assert torch.equal(corr(v, t, cond), plain.sampling_correction("to_fm")(v, t, cond["colour"].ids))
