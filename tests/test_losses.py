"""The FM / ΔFM loss functions: exact values, gradients, reductions and input validation."""

import pytest
import torch

import deltafm
from deltafm.losses import contrastive_flow_matching_parts


def _batch(b=6, shape=(3, 4, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    target = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    return pred, target


def test_lambda_zero_is_exactly_flow_matching():
    pred, target = _batch()
    j = torch.tensor([1, 2, 3, 4, 5, 0])
    for red in ("mean", "sum", "none"):
        a = deltafm.contrastive_flow_matching_loss(pred, target, j, lam=0.0, reduction=red)
        b = deltafm.flow_matching_loss(pred, target, reduction=red)
        assert torch.equal(a, b)


@pytest.mark.parametrize("lam", [0.0, 0.05, 0.5, 0.99])
def test_loss_matches_hand_computation(lam):
    pred, target = _batch()
    j = torch.tensor([3, 0, 5, 1, 1, 2])
    d = pred[0].numel()
    hand = []
    for i in range(pred.shape[0]):
        pos = sum(float((pred[i] - target[i]).flatten()[k]) ** 2 for k in range(d)) / d
        neg = sum(float((pred[i] - target[int(j[i])]).flatten()[k]) ** 2 for k in range(d)) / d
        hand.append(pos - lam * neg)
    hand = torch.tensor(hand, dtype=torch.float64)
    none = deltafm.contrastive_flow_matching_loss(pred, target, j, lam=lam, reduction="none")
    torch.testing.assert_close(none, hand, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        deltafm.contrastive_flow_matching_loss(pred, target, j, lam=lam, reduction="mean"), hand.mean()
    )
    torch.testing.assert_close(
        deltafm.contrastive_flow_matching_loss(pred, target, j, lam=lam, reduction="sum"), hand.sum()
    )
    parts = contrastive_flow_matching_parts(pred, target, j, lam=lam)
    torch.testing.assert_close(parts.loss, parts.positive - lam * parts.negative)


def test_gradient_matches_closed_form():
    lam = 0.3
    pred, target = _batch()
    pred.requires_grad_(True)
    j = torch.tensor([2, 2, 0, 5, 3, 4])
    loss = deltafm.contrastive_flow_matching_loss(pred, target, j, lam=lam, reduction="sum")
    loss.backward()
    d = pred[0].numel()
    expected = 2.0 / d * ((1 - lam) * pred.detach() - target + lam * target[j])
    torch.testing.assert_close(pred.grad, expected, rtol=1e-12, atol=1e-12)


def test_gathered_pool_of_negatives():
    pred, target = _batch(b=4)
    pool = torch.randn(10, *target.shape[1:], dtype=torch.float64)
    j = torch.tensor([9, 0, 4, 7])
    got = deltafm.contrastive_flow_matching_loss(pred, target, j, lam=0.2, reduction="none", negatives=pool)
    exp = (pred - target).pow(2).flatten(1).mean(1) - 0.2 * (pred - pool[j]).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("lam", [1.0, 1.5, -0.1, float("nan")])
def test_bad_lambda_rejected(lam):
    pred, target = _batch()
    with pytest.raises(ValueError, match="lam"):
        deltafm.contrastive_flow_matching_loss(pred, target, torch.zeros(6, dtype=torch.long), lam=lam)


def test_bad_inputs_have_clear_errors():
    pred, target = _batch()
    j = torch.tensor([1, 2, 3, 4, 5, 0])
    with pytest.raises(ValueError, match="at least 2"):
        deltafm.contrastive_flow_matching_loss(pred[:1], target[:1], torch.tensor([0]))
    with pytest.raises(ValueError, match="same shape"):
        deltafm.contrastive_flow_matching_loss(pred, target[:, :2], j)
    with pytest.raises(ValueError, match="out of range"):
        deltafm.contrastive_flow_matching_loss(pred, target, torch.tensor([1, 2, 3, 4, 5, 6]))
    with pytest.raises(ValueError, match="out of range"):
        deltafm.contrastive_flow_matching_loss(pred, target, torch.tensor([-1, 2, 3, 4, 5, 0]))
    with pytest.raises(ValueError, match="shape"):
        deltafm.contrastive_flow_matching_loss(pred, target, j[:5])
    with pytest.raises(TypeError, match="integer"):
        deltafm.contrastive_flow_matching_loss(pred, target, j.float())
    bad = pred.clone()
    bad[2, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        deltafm.contrastive_flow_matching_loss(bad, target, j)
    bad[2, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        deltafm.flow_matching_loss(pred, bad)
    with pytest.raises(ValueError, match="reduction"):
        deltafm.flow_matching_loss(pred, target, reduction="avg")
