"""CFG, guidance interval, the running mean target and the ΔFM bias correction."""

import pytest
import torch

import deltafm
from deltafm.correction import BiasCorrection, MeanTarget
from deltafm.guidance import GuidedVelocity


class ClassField(torch.nn.Module):
    """v(x, t, c) = table[c] (broadcast), so guided values are easy to write down."""

    def __init__(self):
        super().__init__()
        self.table = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])  # classes 0, 1 and null=2

    def forward(self, x, t, c):
        return self.table[c] + 0 * x


def test_cfg_scale_one_equals_conditional():
    m = ClassField()
    x, t = torch.zeros(3, 2), torch.full((3,), 0.5)
    c = torch.tensor([0, 1, 0])
    v = GuidedVelocity(m, c, scale=1.0, null_class=2)
    torch.testing.assert_close(v(x, t), m(x, t, c))
    assert v.forward_passes == 1


def test_cfg_formula_and_interval_switch():
    m = ClassField()
    c = torch.tensor([0, 1])
    w = 3.0
    v = GuidedVelocity(m, c, scale=w, interval=(0.3, 0.7), null_class=2)
    x = torch.zeros(2, 2)
    guided = m.table[2] + w * (m.table[c] - m.table[2])
    torch.testing.assert_close(v(x, torch.full((2,), 0.5)), guided)
    torch.testing.assert_close(v(x, torch.full((2,), 0.3)), guided)  # inclusive
    torch.testing.assert_close(v(x, torch.full((2,), 0.29)), m.table[c])
    torch.testing.assert_close(v(x, torch.full((2,), 0.71)), m.table[c])
    mixed = v(x, torch.tensor([0.1, 0.5]))
    torch.testing.assert_close(mixed, torch.stack([m.table[0], guided[1]]))
    with pytest.raises(ValueError, match="null_class"):
        GuidedVelocity(m, c, scale=2.0)
    with pytest.raises(ValueError, match="interval"):
        GuidedVelocity(m, c, interval=(0.8, 0.2))


def test_mean_target_per_class_and_other_classes():
    mt = MeanTarget(num_classes=3)
    x1 = torch.tensor([[1.0], [3.0], [10.0], [20.0], [-4.0]])
    x0 = torch.zeros(5, 1)
    y = torch.tensor([0, 0, 1, 1, 2])
    mt.update(x1[:2], x0[:2], y[:2])
    mt.update(x1[2:], x0[2:], y[2:])
    m1, m0 = mt.means()
    torch.testing.assert_close(m1, torch.tensor([[6.0]], dtype=torch.float64))
    other, _ = mt.means(torch.tensor([0, 1, 2, 3]), other_classes=True)  # 3 = null
    torch.testing.assert_close(other[:, 0], torch.tensor([26 / 3, 0.0, 34 / 4, 6.0], dtype=torch.float64))
    state = mt.state_dict()
    mt2 = MeanTarget(num_classes=3)
    mt2.load_state_dict(state)
    torch.testing.assert_close(mt2.means(y, True)[0], mt.means(y, True)[0])
    with pytest.raises(RuntimeError, match="no data"):
        MeanTarget().means()


def test_bias_correction_is_the_inverse_of_the_post_hoc_map():
    mt = MeanTarget()
    mt.update(torch.randn(50, 2, 3) + 2.0, torch.randn(50, 2, 3))
    for path in ("linear", "cosine"):
        fwd = BiasCorrection(0.3, mt, path, direction="to_fm")
        back = BiasCorrection(0.3, mt, path, direction="to_delta")
        v = torch.randn(4, 2, 3, dtype=torch.float64)
        t = torch.rand(4, dtype=torch.float64)
        torch.testing.assert_close(fwd(back(v, t, None), t, None), v)
        ub = fwd.u_bar(t, None)
        torch.testing.assert_close(fwd(v, t, None), 0.7 * v + 0.3 * ub)
    with pytest.raises(ValueError, match="lam"):
        BiasCorrection(1.0, mt)


# --- training on Gaussian data, where the FM optimum is closed form -----------------------------

MUS = torch.tensor([[2.0, -1.0], [-1.0, 3.0]], dtype=torch.float64)
S = 0.5


def v_fm_true(x, t, y):
    """E[x1 - x0 | x_t = x, y] for x1 ~ N(mu_y, S^2 I), x0 ~ N(0, I), x_t = t x1 + (1 - t) x0."""
    mu = MUS[y]
    t = t.reshape(-1, 1)
    var = t**2 * S**2 + (1 - t) ** 2
    return mu + (t * S**2 - (1 - t)) / var * (x - t * mu)


class PolyField(torch.nn.Module):
    """v(x, t, y) = a_y(t) + b_y(t) * x with a, b Chebyshev polynomials of degree 8 in t.

    The family contains a close approximation of the closed-form optima, so training error is
    dominated by optimisation, not by the model class."""

    def __init__(self, classes=2, dim=2, degree=8):
        super().__init__()
        self.degree = degree
        self.a = torch.nn.Parameter(torch.zeros(classes, degree + 1, dim, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.zeros(classes, degree + 1, dim, dtype=torch.float64))

    def features(self, t):
        s = 2 * t - 1
        f = [torch.ones_like(s), s]
        for _ in range(self.degree - 1):
            f.append(2 * s * f[-1] - f[-2])
        return torch.stack(f, dim=1)  # (B, K)

    def forward(self, x, t, y):
        f = self.features(t)
        a = torch.einsum("bk,bkd->bd", f, self.a[y])
        b = torch.einsum("bk,bkd->bd", f, self.b[y])
        return a + b * x


def _train(obj, steps=1500, batch=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = PolyField()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        y = torch.randint(0, 2, (batch,), generator=g)
        x1 = MUS[y] + S * torch.randn(batch, 2, generator=g, dtype=torch.float64)
        out = obj(model, x1, y, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
    return model


def _eval_points(n=4000, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    t = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    x1 = MUS[y] + S * torch.randn(n, 2, generator=g, dtype=torch.float64)
    x0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return t[:, None] * x1 + (1 - t[:, None]) * x0, t, y


def _rms(a):
    return float(a.pow(2).mean().sqrt())


@pytest.mark.parametrize("negatives", ["uniform", "different_class"])
def test_delta_fm_learns_shifted_optimum_and_correction_recovers_fm(negatives):
    """With λ = 0.5 the ΔFM optimum (v_FM - λ ū)/(1 - λ) sits far from v_FM (their RMS gap is the
    scale against which we measure); the trained field must be much closer to the ΔFM optimum
    than that gap, and the bias-corrected field much closer to v_FM.  0.15 of the gap leaves room
    for the finite-batch SGD noise of a 1500-step run while still telling the two apart."""
    lam = 0.5
    obj = deltafm.DeltaFMObjective(num_classes=2, label_dropout=0.0, lam=lam, negatives=negatives)
    model = _train(obj)
    x, t, y = _eval_points()
    with torch.no_grad():
        v = model(x, t, y)
    fm = v_fm_true(x, t, y)
    if negatives == "uniform":
        u_bar = MUS.mean(0).expand_as(fm)  # data mean minus noise mean (0), classes balanced
    else:
        u_bar = MUS[1 - y]  # the other class's mean
    v_lam = (fm - lam * u_bar) / (1 - lam)
    gap = _rms(v_lam - fm)
    assert gap > 1.0
    assert _rms(v - v_lam) < 0.15 * gap
    corrected = obj.bias_correction()(v, t, y)
    assert _rms(corrected - fm) < 0.15 * gap
    # the estimated mean negative target agrees with the true one (standard error ~ S/sqrt(1.5M))
    torch.testing.assert_close(obj.bias_correction().u_bar(t, y), u_bar, atol=0.01, rtol=0)


def test_correction_window_modes():
    from deltafm.correction import correction_window

    assert correction_window("off", (0.35, 1.0)) is None
    assert correction_window(False, (0.35, 1.0)) is None
    assert correction_window("always", (0.35, 1.0)) == (0.0, 1.0)
    assert correction_window(True, (0.35, 1.0)) == (0.0, 1.0)
    assert correction_window("guidance", (0.35, 1.0)) == (0.35, 1.0)
    with pytest.raises(ValueError, match="correction mode"):
        correction_window("sometimes", (0.0, 1.0))


def test_bias_correction_acts_only_inside_its_interval():
    mt = MeanTarget()
    g = torch.Generator().manual_seed(0)
    mt.update(torch.randn(64, 3, generator=g) + 2.0, torch.randn(64, 3, generator=g))
    v = torch.randn(4, 3, generator=g)
    t = torch.tensor([0.1, 0.35, 0.7, 1.0])
    full = BiasCorrection(lam=0.2, mean_target=mt)
    part = BiasCorrection(lam=0.2, mean_target=mt, interval=(0.35, 1.0))
    out_full, out_part = full(v, t, None), part(v, t, None)
    assert torch.equal(out_part[0], v[0])  # t = 0.1 lies outside: unchanged
    assert torch.equal(out_part[1:], out_full[1:])  # inclusive interval: mapped exactly as always
    assert not torch.allclose(out_full[0], v[0])
    with pytest.raises(ValueError, match="interval"):
        BiasCorrection(lam=0.2, mean_target=mt, interval=(0.8, 0.2))
