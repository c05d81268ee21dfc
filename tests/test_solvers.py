"""ODE / SDE solvers against analytic solutions, their convergence order and NFE counts."""

import math

import numpy as np
import pytest
import torch

import deltafm
from deltafm.solvers import sample_ode, sample_sde

METHOD_ORDER = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
NFE_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


def v_t2(x, t):
    return 3 * t.reshape(-1, 1) ** 2 * torch.ones_like(x)  # x(1) = x(0) + 1


def v_exp(x, t):
    return x  # x(1) = e x(0)


X0 = torch.tensor([[1.0], [-0.5], [2.0]], dtype=torch.float64)


@pytest.mark.parametrize("method", list(METHOD_ORDER))
def test_constant_velocity_is_exact(method):
    a = torch.tensor([[0.3], [-2.0], [1.5]], dtype=torch.float64)
    res = sample_ode(lambda x, t: a.expand_as(x), X0, steps=3, method=method)
    torch.testing.assert_close(res.x, X0 + a, rtol=0, atol=1e-14)
    assert res.nfe == 3 * NFE_PER_STEP[method]


def _order(method, v, exact, steps=(8, 16, 32, 64)):
    errs = [float((sample_ode(v, X0, steps=n, method=method).x - exact).abs().max()) for n in steps]
    slope = np.polyfit(np.log([1.0 / n for n in steps]), np.log(errs), 1)[0]
    return slope, errs


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun"])
def test_order_on_polynomial_field(method):
    slope, _ = _order(method, v_t2, X0 + 1.0)
    assert abs(slope - METHOD_ORDER[method]) < 0.15, slope


def test_rk4_is_exact_on_cubic_solution():
    res = sample_ode(v_t2, X0, steps=2, method="rk4")
    torch.testing.assert_close(res.x, X0 + 1.0, rtol=0, atol=1e-14)


@pytest.mark.parametrize("method", list(METHOD_ORDER))
def test_order_on_linear_ode(method):
    slope, errs = _order(method, v_exp, X0 * math.e, steps=(4, 8, 16, 32))
    assert abs(slope - METHOD_ORDER[method]) < 0.2, (slope, errs)


def test_dopri5_adaptive_matches_analytic_and_counts_nfe():
    res = sample_ode(v_exp, X0, steps=1, method="dopri5", rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(res.x, X0 * math.e, rtol=1e-7, atol=1e-7)
    assert res.nfe > 6
    loose = sample_ode(v_exp, X0, steps=1, method="dopri5", rtol=1e-3, atol=1e-3)
    assert loose.nfe < res.nfe


def test_custom_grid_trajectory_and_float64_state():
    grid = torch.tensor([0.0, 0.1, 0.5, 1.0])
    x0 = X0.float()
    res = sample_ode(v_t2, x0, method="euler", grid=grid, return_trajectory=True, dtype=torch.float64)
    assert res.x.dtype == torch.float64 and len(res.trajectory) == 4 and res.nfe == 3
    # Euler on the grid: sum of h_k * 3 t_k^2
    expected = x0.double() + 0.1 * 0 + 0.4 * 3 * 0.01 + 0.5 * 3 * 0.25
    torch.testing.assert_close(res.x, expected)
    with pytest.raises(ValueError, match="increasing"):
        sample_ode(v_t2, x0, grid=torch.tensor([0.0, 0.5, 0.4]))
    with pytest.raises(ValueError, match="unknown ODE method"):
        sample_ode(v_t2, x0, method="rk45")


def test_sde_without_diffusion_is_euler_on_its_grid():
    path = deltafm.LinearPath()
    res = sample_sde(v_exp, X0, steps=10, path=path, diffusion_scale=0.0)
    grid = torch.cat([torch.linspace(0, 0.96, 10, dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)])
    ref = sample_ode(v_exp, X0, method="euler", grid=grid)
    torch.testing.assert_close(res.x, ref.x)
    assert res.nfe == 10


def test_sde_samples_gaussian_target_with_exact_velocity():
    """Data N(mu, s^2), source N(0, 1), linear path: the FM velocity is closed form; the SDE must
    land on the data distribution.  Tolerances: Monte-Carlo standard error of the mean with
    n = 20000 is s/sqrt(n) ~ 0.004, plus O(h) discretisation bias at 100 steps."""
    mu, s = 1.5, 0.5

    def v_fm(x, t):
        t = t.reshape(-1, 1)
        var = t**2 * s**2 + (1 - t) ** 2
        return mu + (t * s**2 - (1 - t)) / var * (x - t * mu)

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(20000, 1, generator=g, dtype=torch.float64)
    out = sample_sde(v_fm, x0, steps=100, path="linear", generator=g).x
    assert abs(float(out.mean()) - mu) < 0.03
    assert abs(float(out.std()) - s) < 0.03
    ode = sample_ode(v_fm, x0, steps=100, method="heun").x
    assert abs(float(ode.std()) - s) < 0.01
    # reproducible per seed
    again = sample_sde(v_fm, x0, steps=100, path="linear", generator=torch.Generator().manual_seed(0))
    g2 = torch.Generator().manual_seed(0)
    torch.randn(20000, 1, generator=g2, dtype=torch.float64)
    again = sample_sde(v_fm, x0, steps=100, path="linear", generator=g2).x
    assert torch.equal(again, out)
