"""Paths: endpoints, targets as time derivatives, conversions, time-convention converters."""

import pytest
import torch

import deltafm
from deltafm.paths import get_path

PATHS = ["linear", "cosine", "vp"]


def _data(seed=0, b=5):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(b, 3, 2, generator=g, dtype=torch.float64)
    x0 = torch.randn(b, 3, 2, generator=g, dtype=torch.float64)
    t = torch.rand(b, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return x1, x0, t


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_endpoints(name):
    p = get_path(name)
    x1, x0, _ = _data()
    b = x1.shape[0]
    torch.testing.assert_close(p.interpolate(x1, x0, torch.zeros(b, dtype=torch.float64)), x0)
    torch.testing.assert_close(p.interpolate(x1, x0, torch.ones(b, dtype=torch.float64)), x1)


def test_vp_endpoints():
    p = get_path("vp")
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    assert float(p.alpha(one)) == 1.0 and float(p.sigma(one)) == 0.0
    assert float(p.alpha(zero)) < 0.01 and abs(float(p.sigma(zero)) - 1) < 1e-4
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(p.alpha(t) ** 2 + p.sigma(t) ** 2, torch.ones_like(t))


def test_linear_target_is_data_minus_noise():
    x1, x0, t = _data()
    torch.testing.assert_close(deltafm.LinearPath().target(x1, x0, t), x1 - x0)


@pytest.mark.parametrize("name", PATHS)
def test_target_is_time_derivative(name):
    p = get_path(name)
    x1, x0, t = _data()
    h = 1e-6
    fd = (p.interpolate(x1, x0, t + h) - p.interpolate(x1, x0, t - h)) / (2 * h)
    torch.testing.assert_close(p.target(x1, x0, t), fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", PATHS)
def test_conversions_round_trip(name):
    p = get_path(name)
    x1, x0, t = _data()
    s = p.sample(x1, x0, t)
    torch.testing.assert_close(p.velocity_to_data(s.u, s.x_t, t), x1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(p.velocity_to_noise(s.u, s.x_t, t), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(p.data_to_velocity(x1, s.x_t, t), s.u, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(p.noise_to_velocity(x0, s.x_t, t), s.u, rtol=1e-10, atol=1e-10)
    v = torch.randn_like(s.u)
    torch.testing.assert_close(p.data_to_velocity(p.velocity_to_data(v, s.x_t, t), s.x_t, t), v)


def test_reference_convention_round_trip():
    x1, x0, t = _data()
    u = deltafm.LinearPath().target(x1, x0, t)
    t_ref, u_ref = deltafm.to_reference_time(t, u)
    # in the reference convention x_t = (1 - t_ref) x1 + t_ref x0 and u_ref = x0 - x1
    torch.testing.assert_close(u_ref, x0 - x1)
    torch.testing.assert_close(t_ref, 1 - t)
    t2, u2 = deltafm.from_reference_time(t_ref, u_ref)
    torch.testing.assert_close(t2, t)
    torch.testing.assert_close(u2, u)
    torch.testing.assert_close(deltafm.from_reference_time(deltafm.to_reference_time(t)), t)


def test_bad_path_inputs():
    with pytest.raises(ValueError, match="unknown path"):
        get_path("spiral")
    x1, x0, t = _data()
    with pytest.raises(ValueError, match="shape"):
        deltafm.LinearPath().sample(x1, x0, t[:2])
    with pytest.raises(ValueError, match="same shape"):
        deltafm.LinearPath().sample(x1, x0[:, :1], t)


def test_time_samplers_reproducible_and_in_range():
    for name, kw in [("uniform", {}), ("logit_normal", {"mean": 0.5, "std": 1.0}), ("mode", {"scale": 1.29})]:
        s = deltafm.get_time_sampler(name, **kw)
        a = s.sample(1000, generator=torch.Generator().manual_seed(0))
        b = s.sample(1000, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a, b) and a.shape == (1000,)
        assert float(a.min()) >= 0 and float(a.max()) <= 1
    # logit-normal with positive mean favours the data side in our convention
    ln = deltafm.get_time_sampler("logit_normal", mean=1.0).sample(20000, generator=torch.Generator().manual_seed(1))
    assert float(ln.mean()) > 0.6
    with pytest.raises(ValueError):
        deltafm.get_time_sampler("beta")


def test_time_grid():
    g = deltafm.time_grid(4)
    torch.testing.assert_close(g, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    gs = deltafm.time_grid(4, shift=3.0)
    assert float(gs[0]) == 0.0 and abs(float(gs[-1]) - 1.0) < 1e-7
    assert float(gs[1]) < 0.25  # more steps near the noise
