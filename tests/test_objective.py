"""The objective object: exact agreement with the pure losses, dropout, negative time, λ schedules."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import deltafm
from deltafm.schedules import LambdaSchedule


class Lin(torch.nn.Module):
    def __init__(self, d=6, classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(d + 1, d)
        self.emb = torch.nn.Embedding(classes + 1, d)
        self.seen_cond = None

    def forward(self, x, t, c):
        self.seen_cond = c
        return self.lin(torch.cat([x, t[:, None]], 1)) + (0 if c is None else self.emb(c))


def _batch(b=16, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randint(0, 4, (b,), generator=g)


def test_lambda_zero_objective_equals_flow_matching_loss():
    model, (x, y) = Lin(), _batch()
    g = torch.Generator().manual_seed(1)
    t, noise = torch.rand(16, generator=g), torch.randn(16, 6, generator=g)
    obj = deltafm.DeltaFMObjective(lam=0.0, num_classes=4, label_dropout=0.0)
    out = obj(model, x, y, t=t, noise=noise)
    x_t = t[:, None] * x + (1 - t[:, None]) * noise
    expected = deltafm.flow_matching_loss(model(x_t, t, y), x - noise)
    assert torch.equal(out.loss.detach(), expected.detach())
    fm = deltafm.DeltaFMObjective(negatives="none", num_classes=4, label_dropout=0.0)
    assert torch.equal(fm(model, x, y, t=t, noise=noise).loss.detach(), expected.detach())


def test_objective_matches_pure_loss_and_is_reproducible():
    model, (x, y) = Lin(), _batch()
    obj = deltafm.DeltaFMObjective(lam=0.2, num_classes=4, label_dropout=0.3)
    a = obj(model, x, y, generator=torch.Generator().manual_seed(7))
    b = obj(model, x, y, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.neg_index, b.neg_index)
    assert not bool((a.neg_index == torch.arange(16)).any())
    expected = deltafm.contrastive_flow_matching_loss(a.pred, a.sample.u, a.neg_index, lam=0.2)
    torch.testing.assert_close(a.loss, expected)
    torch.testing.assert_close(a.parts["loss"], a.parts["positive"] - 0.2 * a.parts["negative"])
    # label dropout: the model saw the null id exactly where dropped
    assert torch.equal(a.cond, torch.where(a.dropped, torch.full_like(y, 4), y))
    a.loss.backward()


def test_label_dropout_rate_and_uncontrasted_unconditional_samples():
    model, (x, y) = Lin(), _batch(b=4000)
    obj = deltafm.DeltaFMObjective(lam=0.3, num_classes=4, label_dropout=0.1, contrast_unconditional=False)
    out = obj(model, x, y, generator=torch.Generator().manual_seed(0))
    rate = float(out.dropped.float().mean())
    assert abs(rate - 0.1) < 4 * (0.1 * 0.9 / 4000) ** 0.5  # 4 standard errors
    parts = deltafm.contrastive_flow_matching_parts(out.pred, out.sample.u, out.neg_index, 0.3)
    per = torch.where(out.dropped, parts.positive, parts.loss)
    torch.testing.assert_close(out.loss, per.mean())


def test_negative_time_anchor_vs_own():
    model, (x, y) = Lin(), _batch()
    for path, differ in (("linear", False), ("cosine", True)):
        outs = {}
        for nt in ("anchor", "own"):
            obj = deltafm.DeltaFMObjective(path=path, lam=0.5, num_classes=4, label_dropout=0.0, negative_time=nt)
            outs[nt] = obj(model, x, y, generator=torch.Generator().manual_seed(3))
        a, o = outs["anchor"], outs["own"]
        assert torch.equal(a.neg_index, o.neg_index)
        assert (not torch.allclose(a.loss, o.loss)) == differ
        # anchor time: ũ_i = α̇(t_i) x1[j] + σ̇(t_i) x0[j]
        p, s, j = deltafm.get_path(path), a.sample, a.neg_index
        u_neg = p.target(s.x1[j], s.x0[j], s.t)
        pos = (a.pred - s.u).pow(2).mean(1)
        neg = (a.pred - u_neg).pow(2).mean(1)
        torch.testing.assert_close(a.loss, (pos - 0.5 * neg).mean())


def test_mean_target_tracks_batches():
    model, (x, y) = Lin(), _batch()
    obj = deltafm.DeltaFMObjective(lam=0.1, num_classes=4, label_dropout=0.5)
    out = obj(model, x, y, generator=torch.Generator().manual_seed(0))
    m1, m0 = obj.mean_target.means()
    torch.testing.assert_close(m1[0].float(), x.mean(0))
    torch.testing.assert_close(m0[0].float(), out.sample.x0.mean(0))


def test_objective_validation():
    model, (x, y) = Lin(), _batch()
    with pytest.raises(ValueError, match="lam"):
        deltafm.DeltaFMObjective(lam=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        deltafm.DeltaFMObjective(negatives="different_class")
    with pytest.raises(ValueError, match="unknown negatives"):
        deltafm.DeltaFMObjective(negatives="nearest")
    obj = deltafm.DeltaFMObjective(num_classes=4)
    with pytest.raises(ValueError, match="class ids"):
        obj(model, x, torch.full_like(y, 4))
    with pytest.raises(ValueError, match="at least 2"):
        obj(model, x[:1], y[:1])


def test_lambda_schedules():
    lin = LambdaSchedule("linear", start=0.0, end=0.1, duration=1000)
    assert lin(0) == 0.0 and abs(lin(500) - 0.05) < 1e-12 and lin(5000) == 0.1
    cos = LambdaSchedule("cosine", start=0.2, end=0.0, duration=100)
    assert cos(0) == 0.2 and abs(cos(50) - 0.1) < 1e-12 and cos(100) == 0.0
    obj = deltafm.DeltaFMObjective(lam=lin, num_classes=4)
    assert obj.lam_at(250) == 0.025
    with pytest.raises(ValueError, match="lam"):
        LambdaSchedule("linear", start=0.0, end=1.2, duration=10)
    with pytest.raises(ValueError, match="duration"):
        LambdaSchedule("cosine", end=0.1)


def _gather_worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x = torch.full((3, 2), float(rank))
    pool, offset = deltafm.gather_across_ranks(x)
    labels = torch.tensor([rank, rank, rank])
    sampler = deltafm.NegativeSampler("different_class", gather=True)
    gathered = sampler.pool({"u": x}, labels)
    idx = sampler.indices(gathered, labels, torch.Generator().manual_seed(rank))
    out[rank] = (pool.clone(), offset, idx.clone(), gathered.offset, gathered.labels.clone())
    dist.destroy_process_group()


def test_negatives_gathered_across_two_ranks(tmp_path):
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    out = manager.dict()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_gather_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, start_method="spawn")
    for rank in range(2):
        pool, offset, idx, off2, pool_labels = out[rank]
        assert pool.shape == (6, 2) and offset == off2 == 3 * rank
        torch.testing.assert_close(pool[:3], torch.zeros(3, 2))
        torch.testing.assert_close(pool[3:], torch.ones(3, 2))
        # different-class negatives from the gathered pool must come from the other rank
        assert bool((pool_labels[idx] != rank).all())
