"""Toy 2-D study: datasets (class structure, exact densities), metrics on known cases, the MLPs,
and determinism of a tiny end-to-end run."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from deltafm.models.mlp import ConditionalMLP, build_toy_mlp
from deltafm.solvers import sample_ode
from deltafm.toy.config import preset_config
from deltafm.toy.datasets import DATASETS, Checkerboard, PaperGaussians, Rings, get_dataset
from deltafm.toy.evaluate import steps_within
from deltafm.toy.metrics import (
    bayes_rate,
    binomial_tolerance,
    class_accuracy,
    exact_w2,
    field_overlap,
    path_deviation,
    sliced_w2,
    straightness,
)
from deltafm.toy.oracle import GaussianOracle
from deltafm.toy.study import run_study
from deltafm.toy.train import train_runs


def _grid(bounds, m):
    x0, x1, y0, y1 = bounds
    hx, hy = (x1 - x0) / m, (y1 - y0) / m
    xs = x0 + hx * (torch.arange(m, dtype=torch.float64) + 0.5)
    ys = y0 + hy * (torch.arange(m, dtype=torch.float64) + 0.5)
    return torch.cartesian_prod(xs, ys), hx * hy


@functools.cache
def _grid_density(name):
    """(grid, cell area, p(x | k) on the grid) for a dataset with default parameters (cached)."""
    ds = get_dataset(name)
    grid, da = _grid(ds.bounds, 200)
    return grid, da, ds.log_prob_all(grid).exp()


# -- datasets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_class_densities_integrate_to_one(name):
    ds = get_dataset(name)
    _, da, dens = _grid_density(name)
    mass = dens.sum(0) * da
    assert mass.shape == (ds.num_classes,)
    assert torch.allclose(mass, torch.ones_like(mass), atol=2e-3), mass


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_samples_match_densities_on_quadrants(name):
    """Per class, the empirical frequency of each quadrant equals the density's mass there."""
    ds = get_dataset(name)
    g = torch.Generator().manual_seed(0)
    n = 4000
    grid, da, lp = _grid_density(name)
    quad_grid = (grid[:, 0] > 0).long() * 2 + (grid[:, 1] > 0).long()
    for k in range(ds.num_classes):
        x = ds.sample_class(torch.full((n,), k, dtype=torch.long), g)
        assert x.shape == (n, 2) and x.dtype == torch.float32
        assert torch.isfinite(ds.log_prob(x, k)).all()
        quad = (x[:, 0] > 0).long() * 2 + (x[:, 1] > 0).long()
        for q in range(4):
            p = float(lp[quad_grid == q, k].sum() * da)
            freq = float((quad == q).double().mean())
            assert abs(freq - p) < binomial_tolerance(p, n) + 3e-3, (k, q, freq, p)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_sample_labels_follow_class_probs(name):
    ds = get_dataset(name)
    n = 8000
    x, y = ds.sample(n, torch.Generator().manual_seed(1))
    assert x.shape == (n, 2) and y.shape == (n,) and y.dtype == torch.long
    freq = torch.bincount(y, minlength=ds.num_classes).double() / n
    for k in range(ds.num_classes):
        p = float(ds.class_probs[k])
        assert abs(float(freq[k]) - p) < binomial_tolerance(p, n)


def test_sampling_is_seeded():
    for name in DATASETS:
        ds = get_dataset(name)
        a = ds.sample(100, torch.Generator().manual_seed(3))
        b = ds.sample(100, torch.Generator().manual_seed(3))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(ds.sample_source(10, torch.Generator().manual_seed(4)),
                           ds.sample_source(10, torch.Generator().manual_seed(4)))


def test_paper_setting_geometry_and_source():
    ds = PaperGaussians()
    assert ds.num_classes == 2
    assert torch.allclose(ds.means[0], torch.tensor([5.0, 0.0], dtype=torch.float64))
    ang = math.degrees(math.atan2(float(ds.means[1, 1]), float(ds.means[1, 0])))
    assert ang == pytest.approx(4 * math.pi, abs=1e-9)  # 12.566°
    assert float(ds.means[1].norm()) == pytest.approx(5.0)
    x0 = ds.sample_source(20000, torch.Generator().manual_seed(0))
    assert torch.allclose(x0.mean(0), torch.tensor([-15.0, 0.0]), atol=4 * 0.5 / math.sqrt(20000))
    assert float(x0.std(0).mean()) == pytest.approx(0.5, abs=0.02)


def test_checkerboard_classes_by_cell():
    ds = Checkerboard(n=4, classes="parity")
    x, y = ds.sample(8000, torch.Generator().manual_seed(0))
    cells = ds.cell_index(x)
    assert (cells >= 0).all()
    # every sample lies in a cell of its own class, and the Bayes classifier is exact
    assert torch.equal(ds.cell_class[cells], y)
    assert torch.equal(ds.classify(x), y)
    # cells of a class are equally likely: 8 cells per class
    for k in range(2):
        counts = torch.bincount(cells[y == k], minlength=16)[ds.cell_class == k].double()
        p, n = 1 / 8, int((y == k).sum())
        assert ((counts / n - p).abs() < binomial_tolerance(p, n)).all()
    # density: 1 / (8 cells · 1) inside own cells, 0 elsewhere; outside the board no class
    lp = ds.log_prob_all(torch.tensor([[0.5, 0.5], [0.5, -0.5], [3.0, 0.0]]))
    assert lp[0].tolist().count(-math.inf) == 1 and float(lp[0].max()) == pytest.approx(-math.log(8))
    assert int(lp[0].argmax()) != int(lp[1].argmax())
    assert torch.isinf(lp[2]).all() and int(ds.classify(torch.tensor([[3.0, 0.0]]))[0]) == -1
    per_cell = Checkerboard(n=3, classes="cell")
    assert per_cell.num_classes == 9
    xc, yc = per_cell.sample(500, torch.Generator().manual_seed(0))
    assert torch.equal(per_cell.cell_index(xc), yc)


def test_rings_closed_form_matches_angular_quadrature():
    ds = Rings(radii=(1.0, 2.5), noise=0.3)
    x = torch.tensor([[0.3, -0.2], [1.1, 0.4], [-2.0, 1.7], [0.0, 0.0]], dtype=torch.float64)
    phi = (torch.arange(4096, dtype=torch.float64) + 0.5) * (2 * math.pi / 4096)
    for k, r in enumerate(ds.radii.tolist()):
        c = r * torch.stack([phi.cos(), phi.sin()], 1)
        d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        p = (torch.exp(-d2 / (2 * 0.09)) / (2 * math.pi * 0.09)).mean(1)
        assert torch.allclose(ds.log_prob(x, k).exp(), p, rtol=1e-9, atol=1e-300)


def test_paper_bayes_rate_grid_matches_closed_form():
    ds = PaperGaussians()
    exact = ds.bayes_rate_exact()
    assert exact == pytest.approx(0.5 * (1 + math.erf(5 * math.sin(math.radians(2 * math.pi)) / 0.5 / math.sqrt(2))))
    assert bayes_rate(ds, resolution=400, bounds=(1.0, 8.0, -3.0, 4.5)) == pytest.approx(exact, abs=1e-4)
    assert bayes_rate(ds) == exact


# -- metrics ------------------------------------------------------------------------------------


def test_w2_known_cases():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 2, generator=g)
    assert exact_w2(a, a) == pytest.approx(0.0, abs=1e-12)
    assert exact_w2(a, a[torch.randperm(200, generator=g)]) == pytest.approx(0.0, abs=1e-12)
    shift = torch.tensor([3.0, -4.0])
    assert exact_w2(a, a + shift) == pytest.approx(5.0, rel=1e-6)  # translation: W2 = |c|
    assert sliced_w2(a, a[torch.randperm(200, generator=g)]) == pytest.approx(0.0, abs=1e-12)
    # a translation by c moves each projection by <c, θ>: SW2² = mean_θ <c, θ>² (same directions)
    sw = sliced_w2(a, a + shift, num_projections=64, generator=torch.Generator().manual_seed(5))
    th = torch.randn(2, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    th = th / th.norm(dim=0, keepdim=True)
    assert sw == pytest.approx(float((shift.double() @ th).pow(2).mean().sqrt()), rel=1e-6)
    assert sw <= exact_w2(a, a + shift) + 1e-9
    with pytest.raises(ValueError):
        exact_w2(a, a[:10])


@pytest.mark.parametrize("name", ["paper", "moons", "8gaussians", "rings"])
def test_true_samples_reach_the_bayes_rate(name):
    ds = get_dataset(name)
    n = 10000
    x, y = ds.sample(n, torch.Generator().manual_seed(2))
    rate = bayes_rate(ds, resolution=200)
    acc = class_accuracy(ds, x, y)
    assert abs(acc - rate) < binomial_tolerance(rate, n) + 1e-3, (acc, rate)


def test_accuracy_of_swapped_labels_is_the_error_rate():
    ds = PaperGaussians()
    x, y = ds.sample(10000, torch.Generator().manual_seed(0))
    assert class_accuracy(ds, x, 1 - y) == pytest.approx(1 - class_accuracy(ds, x, y), abs=1e-12)
    assert class_accuracy(ds, torch.full((3, 2), float("nan")), torch.zeros(3, dtype=torch.long)) == 0.0


def test_field_overlap_known_angles():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(500, 2, generator=g)
    same = field_overlap(torch.stack([v, 3 * v]))
    assert same["overlap"] == 1.0 and same["angle_deg"] == pytest.approx(0.0, abs=1e-5)
    opp = field_overlap(torch.stack([v, -v]))
    assert opp["overlap"] == 0.0 and opp["angle_deg"] == pytest.approx(180.0, abs=1e-5)
    c, s = math.cos(math.radians(10)), math.sin(math.radians(10))
    rot = v @ torch.tensor([[c, s], [-s, c]])
    r = field_overlap(torch.stack([v, rot]), angle_deg=5.0)
    assert r["overlap"] == 0.0 and r["angle_deg"] == pytest.approx(10.0, abs=1e-3)
    assert field_overlap(torch.stack([v, rot]), angle_deg=15.0)["overlap"] == 1.0
    # three classes: pairs (v, v) overlap, (v, rot) twice do not -> 1/3
    assert field_overlap(torch.stack([v, v, rot]))["overlap"] == pytest.approx(1 / 3)


def test_straightness():
    line = torch.linspace(0, 1, 11)[:, None, None] * torch.tensor([[2.0, 1.0]])
    assert torch.allclose(straightness(line), torch.ones(1, dtype=torch.float64))
    bent = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[1.0, 1.0]]])
    assert float(straightness(bent)[0]) == pytest.approx(math.sqrt(2) / 2)


# -- models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["reference", "wide"])
def test_conditional_mlp(preset):
    torch.manual_seed(0)
    m = build_toy_mlp(preset, num_classes=3)
    x, t = torch.randn(5, 2), torch.rand(5)
    for cond in (torch.tensor([0, 1, 2, 3, 1]),):  # id 3 is the null class
        out = m(x, t, cond)
        assert out.shape == (5, 2)
    a = m(x, t, torch.zeros(5, dtype=torch.long))
    b = m(x, t, torch.ones(5, dtype=torch.long))
    assert not torch.allclose(a, b)  # the class changes the field
    with pytest.raises(ValueError):
        m(x, t, torch.full((5,), 4))
    with pytest.raises(ValueError):
        m(x, t, torch.zeros(5))
    assert m.null_class == 3


def test_reference_mlp_adds_embedding_to_input():
    m = build_toy_mlp("reference", num_classes=2)
    assert isinstance(m, ConditionalMLP) and m.embed.weight.shape == (3, 3)
    x, t, c = torch.randn(4, 2), torch.rand(4), torch.tensor([0, 1, 2, 0])
    h = torch.cat([x, t[:, None]], 1) + m.embed.weight[c]
    assert torch.allclose(m(x, t, c), m.net(h))
    assert [type(layer).__name__ for layer in m.net] == ["Linear", "Tanh", "Linear", "Tanh", "Linear"]


def test_path_deviation():
    line = torch.linspace(0, 1, 11)[:, None, None] * torch.tensor([[2.0, 1.0]])
    assert float(path_deviation(line)[0]) == pytest.approx(0.0, abs=1e-12)
    # (0,0) -> (1,0) -> (1,1) at h = 1/2: velocities (2,0), (0,2), mean (1,1): S = 2·(1/2)·2 = 2
    bent = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[1.0, 1.0]]])
    assert float(path_deviation(bent)[0]) == pytest.approx(2.0)


# -- the closed-form (oracle) fields ------------------------------------------------------------


@pytest.mark.parametrize("name", ["paper", "8gaussians"])
def test_oracle_fm_field_transports_source_to_each_class_exactly(name):
    """The ODE of the exact Gaussian FM field maps x0 to μ_k + (s_k/s0)(x0 − μ0) at t = 1."""
    ds = get_dataset(name)
    oracle = GaussianOracle(ds)
    n = 64
    x0 = ds.sample_source(n * ds.num_classes, torch.Generator().manual_seed(0)).double()
    y = torch.arange(ds.num_classes).repeat_interleave(n)
    res = sample_ode(lambda x, t: oracle(x, t, y), x0, steps=200, method="rk4")
    expect = ds.means[y] + (ds.std / oracle.src_std) * (x0 - oracle.src_mean)
    assert torch.allclose(res.x, expect, atol=1e-6)


def test_oracle_fm_field_is_the_conditional_mean_of_the_target():
    """E[v(x_t)] = E[u] and E[(u − v(x_t)) x_t] = 0 (the residual of E[u | x_t] is orthogonal to x_t),
    per class and for the null class (the mixture); Monte-Carlo with 4-sigma tolerances."""
    ds = PaperGaussians()
    oracle = GaussianOracle(ds)
    g = torch.Generator().manual_seed(0)
    n = 40000
    for cls in (0, 1, None):
        if cls is None:
            x1, _ = ds.sample(n, g)
            cond = torch.full((n,), ds.num_classes)
        else:
            cond = torch.full((n,), cls)
            x1 = ds.sample_class(cond, g)
        x1, x0 = x1.double(), ds.sample_source(n, g).double()
        t = torch.rand(n, generator=g, dtype=torch.float64) * 0.98 + 0.01
        xt = t[:, None] * x1 + (1 - t[:, None]) * x0
        u = x1 - x0
        r = u - oracle.fm_velocity(xt, t, cond)
        for stat in (r, r * (xt - xt.mean(0))):
            assert (stat.mean(0).abs() < 4 * stat.std(0) / math.sqrt(n)).all(), (cls, stat.mean(0))


def test_oracle_delta_field_is_the_affine_map():
    ds = PaperGaussians()
    x, t, y = torch.randn(10, 2).double(), torch.rand(10).double(), torch.randint(0, 2, (10,))
    fm, delta = GaussianOracle(ds), GaussianOracle(ds, lam=0.5)
    u_bar = ds.means.mean(0) - ds.source_mean  # uniform negatives: mean target over the whole data
    assert torch.allclose(delta(x, t, y), (fm(x, t, y) - 0.5 * u_bar) / 0.5)
    dc = GaussianOracle(ds, lam=0.5, negatives="different_class")
    other = ds.means[1 - y] - ds.source_mean  # different-class negatives: the other class's mean
    assert torch.allclose(dc(x, t, y), (fm(x, t, y) - 0.5 * other) / 0.5)


# -- the study --------------------------------------------------------------------------------------


def _tiny(**kw):
    small = dict(steps=8, eval_per_class=16, nfe=[1, 2], overlap_points=16, overlap_times=[0.5],
                 trajectories_per_class=4)
    return preset_config("tiny", **{**small, **kw})


def _strip_timing(m):
    m = json.loads(json.dumps(m))
    m.pop("timing", None)
    for r in m["training"].values():
        r.pop("seconds")
    return m


def test_study_is_deterministic_per_seed():
    a = run_study(_tiny(seed=3), progress=False, figures=False)
    b = run_study(_tiny(seed=3), progress=False, figures=False)
    c = run_study(_tiny(seed=4), progress=False, figures=False)
    assert _strip_timing(a) == _strip_timing(b)
    assert _strip_timing(a)["variants"] != _strip_timing(c)["variants"]
    names = {v.name for v in _tiny().variants}
    assert set(a["variants"]) == names
    fm = a["variants"]["fm"]["solvers"]
    assert set(fm["euler"]) == {"1", "2"} and set(fm["heun"]) == {"2"}  # Heun needs 2 NFE per step
    assert fm["heun"]["2"]["nfe"] == 2 and fm["euler"]["2"]["nfe"] == 2
    # the bias correction changes the samples of a ΔFM model
    assert a["variants"]["dfm0.5"]["solvers"] != a["variants"]["dfm0.5_corr"]["solvers"]


def test_steps_within_nfe_budget():
    """The study runs the most steps whose cost fits the NFE budget (the row keeps the budget's key)."""
    assert [steps_within("heun", n) for n in (1, 2, 3, 4)] == [None, 1, 1, 2]
    assert [steps_within("rk4", n) for n in (3, 4, 9)] == [None, 1, 2]
    assert steps_within("euler", 5) == 5
    for bad in ("dopri5", "sde", "nope"):
        with pytest.raises(ValueError):
            steps_within(bad, 4)


def test_runs_share_initial_weights_and_data():
    cfg = _tiny(steps=0)
    runs = train_runs(cfg, get_dataset("paper"), progress=False)
    ref = runs["fm"].model.state_dict()
    for r in runs.values():
        assert all(torch.equal(ref[k], v) for k, v in r.model.state_dict().items())
    cfg = _tiny(steps=3)
    runs = train_runs(cfg, get_dataset("paper"), progress=False)
    # the objectives saw the same data and source: identical running means
    m = [r.objective.mean_target.state_dict() for r in runs.values()]
    assert all(torch.equal(m[0]["sum_x1"], x["sum_x1"]) and torch.equal(m[0]["sum_x0"], x["sum_x0"]) for x in m)


def test_cli_writes_outputs(tmp_path, capsys):
    from deltafm.toy.cli import main

    rc = main(["--preset", "tiny", "--out", str(tmp_path / "a"), "--steps", "5", "--eval-per-class", "12",
               "--no-progress"])
    assert rc == 0
    for f in ("metrics.json", "results.md", "trajectories.png", "fields.png", "metrics_vs_nfe.png",
              "overlap_vs_t.png"):
        assert (tmp_path / "a" / f).is_file(), f
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["config"]["steps"] == 5 and m["config"]["preset"] == "tiny"
    assert "| FM |" in (tmp_path / "a" / "results.md").read_text()
    assert main(["--preset", "nope", "--out", str(tmp_path / "b")]) == 2
    assert main(["--out", str(tmp_path / "c"), "--steps", "0"]) == 2
