"""Negative samplers: never self / never same class, reproducible, uniform over the others."""

import pytest
import torch

import deltafm
from deltafm.negatives import NegativeSampler


def test_uniform_never_self_and_reproducible():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for b in (2, 3, 17, 256):
        a = deltafm.uniform_negatives(b, generator=g1)
        assert a.shape == (b,) and a.dtype == torch.long
        assert not bool((a == torch.arange(b)).any())
        assert torch.equal(a, deltafm.uniform_negatives(b, generator=g2))


def test_uniform_is_uniform_over_the_others_chi_square():
    scipy_stats = pytest.importorskip("scipy.stats")
    b, draws = 8, 14_000
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([deltafm.uniform_negatives(b, generator=g) for _ in range(draws)])  # (draws, b)
    for anchor in (0, 5):
        counts = torch.bincount(idx[:, anchor], minlength=b).double()
        assert counts[anchor] == 0
        others = torch.cat([counts[:anchor], counts[anchor + 1 :]])
        expected = draws / (b - 1)
        stat = float(((others - expected) ** 2 / expected).sum())
        # reject uniformity at the 0.1% level with b - 2 = 6 degrees of freedom
        assert stat < scipy_stats.chi2.ppf(0.999, df=b - 2), stat
    # independence across anchors: the joint of anchors (0, 1) has no structure either
    joint = torch.bincount(idx[:, 0] * b + idx[:, 1], minlength=b * b).double().reshape(b, b)
    cells = [(p, q) for p in range(b) for q in range(b) if p != 0 and q != 1]
    obs = torch.tensor([joint[p, q] for p, q in cells])
    exp = draws / len(cells)
    stat = float(((obs - exp) ** 2 / exp).sum())
    assert stat < scipy_stats.chi2.ppf(0.999, df=len(cells) - 1), stat


def test_uniform_with_pool_offset_excludes_own_global_position():
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        j = deltafm.uniform_negatives(4, generator=g, pool_size=12, offset=4)
        assert not bool((j == torch.arange(4, 8)).any())
        assert int(j.min()) >= 0 and int(j.max()) < 12


def test_derangement_is_a_permutation_without_fixed_points():
    g = torch.Generator().manual_seed(0)
    for b in (2, 3, 10, 64):
        p = deltafm.derangement_negatives(b, generator=g)
        assert torch.equal(torch.sort(p).values, torch.arange(b))
        assert not bool((p == torch.arange(b)).any())
    with pytest.raises(ValueError):
        deltafm.derangement_negatives(1)


def test_different_class_never_same_class_and_covers_all_others():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0, 3])
    seen = {i: set() for i in range(len(labels))}
    for _ in range(400):
        j = deltafm.different_class_negatives(labels, generator=g)
        assert not bool((labels[j] == labels).any())
        for i, jj in enumerate(j.tolist()):
            seen[i].add(jj)
    for i in range(len(labels)):
        assert seen[i] == {k for k in range(len(labels)) if labels[k] != labels[i]}
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(
        deltafm.different_class_negatives(labels, generator=g1), deltafm.different_class_negatives(labels, generator=g2)
    )


def test_different_class_single_class_rule():
    labels = torch.full((5,), 3)
    j = deltafm.different_class_negatives(labels, generator=torch.Generator().manual_seed(0))
    assert not bool((j == torch.arange(5)).any())  # falls back to uniform over the other items
    with pytest.raises(ValueError, match="single class"):
        deltafm.different_class_negatives(labels, fallback="error")


def test_hard_negatives_pick_nearest_other():
    targets = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.2, 5.0], [0.0, 0.3]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    assert deltafm.hard_negatives(targets).tolist() == [1, 0, 3, 2, 0]
    assert deltafm.hard_negatives(targets, labels, other_class_only=True).tolist() == [4, 4, 1, 1, 0]


def test_hard_negatives_mined_on_the_data_ignore_the_noise():
    """hard_on="x1": the negative of each anchor is the other item of nearest clean data x1, whatever the noise;
    mined on u = x1 − x0 (linear path) the large noise decides instead."""
    from deltafm.objective import DeltaFMObjective

    x1 = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.2, 5.0], [0.0, 0.3]]).view(5, 2, 1, 1)
    noise = 100 * torch.randn(5, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    model = lambda x, t, c=None: torch.zeros_like(x)  # noqa: E731
    common = dict(negatives="hard", label_dropout=0.0, num_classes=None)
    on_x1 = DeltaFMObjective(hard_on="x1", **common)(model, x1, noise=noise, t=torch.full((5,), 0.5))
    assert on_x1.neg_index.tolist() == deltafm.hard_negatives(x1).tolist() == [1, 0, 3, 2, 0]
    on_u = DeltaFMObjective(**common)(model, x1, noise=noise, t=torch.full((5,), 0.5))
    assert on_u.neg_index.tolist() == deltafm.hard_negatives(on_u.sample.u).tolist() != [1, 0, 3, 2, 0]
    with pytest.raises(ValueError, match="mined on"):
        NegativeSampler("hard", mine_on="x0")


def test_sampler_object_and_validation():
    targets = torch.randn(6, 3)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    g = torch.Generator().manual_seed(0)
    sampler = NegativeSampler("different_class")
    pool = sampler.pool({"u": targets}, labels)
    offset, gathered = pool.offset, {k: v for k, v in pool.tensors.items() if v is not targets}
    idx = sampler(targets, labels, g)
    assert offset == 0 and gathered == {} and not bool((labels[idx] == labels).any())
    with pytest.raises(ValueError, match="unknown"):
        NegativeSampler("random")
    with pytest.raises(ValueError, match="derangement"):
        NegativeSampler("derangement", gather=True)
