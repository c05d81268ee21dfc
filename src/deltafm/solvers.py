"""ODE and SDE samplers for a velocity field ``v(x, t)`` (t of shape (B,), t = 0 noise → t = 1 data).

ODE, fixed grid (h = t_{k+1} − t_k):

* ``euler``     x ← x + h v(x, t)                                          (order 1, 1 NFE/step)
* ``midpoint``  x ← x + h v(x + h/2 v(x, t), t + h/2)                      (order 2, 2 NFE/step)
* ``heun``      x̃ = x + h v(x, t);  x ← x + h/2 [v(x, t) + v(x̃, t + h)]     (order 2, 2 NFE/step)
* ``rk4``       classical Runge–Kutta                                      (order 4, 4 NFE/step)
* ``dopri5``    adaptive Dormand–Prince from torchdiffeq (rtol/atol)

SDE (:func:`sample_sde`): Euler–Maruyama on the family of SDEs that share the ODE's marginals,

    dx = [v + ½ g²(t) s(x, t)] dt + g(t) dW,     s = ∇log p_t = −x̂0 / σ_t   (Gaussian source)

with the diffusion g²(t) = 2 σ_t · ``diffusion_scale`` (for the linear path σ_t = 1 − t, which is
REPA's diffusion 2·t_ref in its reversed time), integrated on a uniform grid from ``t0`` to
``t_last`` < 1 and finished by one deterministic step to ``t1`` (the score blows up as σ → 0).

Every sampler returns a :class:`SolverResult` with the number of velocity evaluations (NFE).
Integration can run in float64 (``dtype=torch.float64``) while the model sees ``eval_dtype``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .paths import ProbPath, get_path
from .timesteps import time_grid

__all__ = [
    "SolverResult",
    "SolverSpec",
    "SOLVERS",
    "solver_names",
    "get_solver",
    "nfe_to_steps",
    "solve",
    "sample_ode",
    "sample_sde",
    "ODE_METHODS",
    "FIXED_STEP_METHODS",
]

Velocity = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class SolverSpec:
    """A sampler's name, family (``ode`` / ``sde``), velocity evaluations per step and fewest steps.

    ``nfe_per_step`` is None for the adaptive ``dopri5`` (its NFE depends on the tolerances).
    """

    name: str
    kind: str
    nfe_per_step: int | None
    min_steps: int = 1


#: The one registry of samplers: the CLI choices, the config check, the study and the toy read it.
SOLVERS: dict[str, SolverSpec] = {
    s.name: s
    for s in (
        SolverSpec("euler", "ode", 1),
        SolverSpec("heun", "ode", 2),
        SolverSpec("midpoint", "ode", 2),
        SolverSpec("rk4", "ode", 4),
        SolverSpec("dopri5", "ode", None),
        SolverSpec("sde", "sde", 1, min_steps=2),
    )
}
FIXED_STEP_METHODS = tuple(n for n, s in SOLVERS.items() if s.kind == "ode" and s.nfe_per_step is not None)
ODE_METHODS = tuple(n for n, s in SOLVERS.items() if s.kind == "ode")


def solver_names(fixed_nfe: bool = False) -> tuple[str, ...]:
    """Names of the registered samplers (``fixed_nfe``: only those with a known NFE per step)."""
    return tuple(n for n, s in SOLVERS.items() if not fixed_nfe or s.nfe_per_step is not None)


def get_solver(name: str) -> SolverSpec:
    """The :class:`SolverSpec` of ``name``; ValueError listing the known names otherwise."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; known: {', '.join(SOLVERS)}")
    return SOLVERS[name]


def nfe_to_steps(solver: str, nfe: int) -> int | None:
    """Steps of ``solver`` that cost exactly ``nfe`` velocity evaluations, or None when impossible
    (NFE not a multiple of the per-step cost, fewer steps than the solver needs, adaptive solver)."""
    spec = get_solver(solver)
    per = spec.nfe_per_step
    if per is None or nfe < 1 or nfe % per:
        return None
    steps = nfe // per
    return steps if steps >= spec.min_steps else None


def solve(
    velocity: Velocity,
    x0: Tensor,
    solver: str,
    steps: int,
    path: ProbPath | str = "linear",
    generator: torch.Generator | None = None,
) -> SolverResult:
    """Integrate from noise ``x0`` (t = 0) to data (t = 1) with a registered sampler.

    ODE solvers go through :func:`sample_ode`; ``sde`` through :func:`sample_sde` on ``path`` with
    noise from ``generator``.
    """
    if get_solver(solver).kind == "sde":
        return sample_sde(velocity, x0, steps=steps, path=path, generator=generator)
    return sample_ode(velocity, x0, steps=steps, method=solver)


@dataclass
class SolverResult:
    """Final state ``x``, the number of velocity evaluations ``nfe``, and optionally the states."""

    x: Tensor
    nfe: int
    trajectory: list[Tensor] = field(default_factory=list)
    times: Tensor | None = None


class _Counted:
    """Wraps v(x, t): broadcasts scalar t to (B,), casts to the evaluation dtype, counts calls."""

    def __init__(self, velocity: Velocity, eval_dtype: torch.dtype, state_dtype: torch.dtype) -> None:
        self.velocity, self.eval_dtype, self.state_dtype = velocity, eval_dtype, state_dtype
        self.nfe = 0

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        self.nfe += 1
        tt = torch.as_tensor(t, dtype=self.eval_dtype, device=x.device)
        if tt.dim() == 0:
            tt = tt.expand(x.shape[0])
        return self.velocity(x.to(self.eval_dtype), tt).to(self.state_dtype)


def _grid(steps: int | None, grid: Tensor | None, t0: float, t1: float, device, dtype) -> Tensor:
    if grid is not None:
        g = torch.as_tensor(grid, dtype=dtype, device=device)
        if g.dim() != 1 or g.numel() < 2:
            raise ValueError("grid must be a 1-D tensor of at least 2 times")
        if not bool((g[1:] > g[:-1]).all()):
            raise ValueError("grid must be strictly increasing (t = 0 noise → t = 1 data)")
        return g
    if steps is None:
        raise ValueError("give steps or grid")
    return time_grid(steps, t0, t1, device=device, dtype=dtype)


@torch.no_grad()
def sample_ode(
    velocity: Velocity,
    x0: Tensor,
    steps: int | None = 50,
    method: str = "euler",
    t0: float = 0.0,
    t1: float = 1.0,
    grid: Tensor | None = None,
    dtype: torch.dtype | None = None,
    eval_dtype: torch.dtype | None = None,
    return_trajectory: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> SolverResult:
    """Integrate dx/dt = v(x, t) from ``t0`` to ``t1`` starting at ``x0``.

    Args:
        velocity: ``v(x, t)`` with t of shape (B,).
        x0: initial state (B, ...), e.g. Gaussian noise at t = 0.
        steps: number of steps on a uniform grid (ignored when ``grid`` is given; for dopri5 it
            only sets the output times of the trajectory).
        method: one of ``euler``, ``midpoint``, ``heun``, ``rk4``, ``dopri5``.
        grid: custom increasing time grid (steps + 1 values).
        dtype: dtype of the integration state (float64 for accurate integration).
        eval_dtype: dtype the velocity is called with (default: x0's dtype).
        return_trajectory: keep the state at every grid time (on the state's device).
    """
    if method not in ODE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}; known: {list(ODE_METHODS)}")
    state_dtype = dtype or x0.dtype
    f = _Counted(velocity, eval_dtype or x0.dtype, state_dtype)
    x = x0.to(state_dtype)
    ts = _grid(steps, grid, t0, t1, x.device, torch.float64)
    traj: list[Tensor] = [x] if return_trajectory else []

    if method == "dopri5":
        from torchdiffeq import odeint

        out = odeint(lambda t, y: f(y, t), x, ts.to(state_dtype), method="dopri5", rtol=rtol, atol=atol)
        if return_trajectory:
            traj = list(out)
        return SolverResult(x=out[-1], nfe=f.nfe, trajectory=traj, times=ts)

    for k in range(ts.numel() - 1):
        t, h = float(ts[k]), float(ts[k + 1] - ts[k])
        if method == "euler":
            x = x + h * f(x, t)
        elif method == "midpoint":
            x = x + h * f(x + 0.5 * h * f(x, t), t + 0.5 * h)
        elif method == "heun":
            k1 = f(x, t)
            k2 = f(x + h * k1, t + h)
            x = x + 0.5 * h * (k1 + k2)
        else:  # rk4
            k1 = f(x, t)
            k2 = f(x + 0.5 * h * k1, t + 0.5 * h)
            k3 = f(x + 0.5 * h * k2, t + 0.5 * h)
            k4 = f(x + h * k3, t + h)
            x = x + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
        if return_trajectory:
            traj.append(x)
    return SolverResult(x=x, nfe=f.nfe, trajectory=traj, times=ts)


@torch.no_grad()
def sample_sde(
    velocity: Velocity,
    x0: Tensor,
    steps: int = 50,
    path: ProbPath | str = "linear",
    generator: torch.Generator | None = None,
    t0: float = 0.0,
    t_last: float = 0.96,
    t1: float = 1.0,
    diffusion_scale: float = 1.0,
    dtype: torch.dtype | None = None,
    eval_dtype: torch.dtype | None = None,
    return_trajectory: bool = False,
) -> SolverResult:
    """Euler–Maruyama sampling with ``steps`` velocity evaluations (see the module docstring).

    ``steps − 1`` stochastic steps on a uniform grid from ``t0`` to ``t_last``, then one
    deterministic drift step to ``t1``.  ``diffusion_scale = 0`` reduces it to Euler on the ODE
    over the same grid.  Noise is drawn from ``generator`` (reproducible per seed).
    """
    if steps < 2:
        raise ValueError(f"the SDE sampler needs steps >= 2 (stochastic steps + a final step), got {steps}")
    if not t0 < t_last < t1:
        raise ValueError(f"need t0 < t_last < t1, got {t0}, {t_last}, {t1}")
    if diffusion_scale < 0:
        raise ValueError(f"diffusion_scale must be >= 0, got {diffusion_scale}")
    path = get_path(path)
    state_dtype = dtype or x0.dtype
    f = _Counted(velocity, eval_dtype or x0.dtype, state_dtype)
    x = x0.to(state_dtype)
    ts = torch.cat([time_grid(steps - 1, t0, t_last, dtype=torch.float64), torch.tensor([t1], dtype=torch.float64)])
    traj: list[Tensor] = [x] if return_trajectory else []
    b = x.shape[0]

    def drift(x: Tensor, t: float) -> Tensor:
        v = f(x, t)
        tt = torch.full((b,), t, dtype=state_dtype, device=x.device)
        sigma = path.sigma(tt)
        g2 = 2.0 * diffusion_scale * sigma
        eps_hat = path.velocity_to_noise(v, x, tt)
        score = -eps_hat / sigma.reshape(-1, *([1] * (x.dim() - 1)))
        return v + 0.5 * g2.reshape(-1, *([1] * (x.dim() - 1))) * score, g2

    for k in range(ts.numel() - 1):
        t, h = float(ts[k]), float(ts[k + 1] - ts[k])
        d, g2 = drift(x, t)
        x = x + h * d
        if k < ts.numel() - 2 and diffusion_scale > 0:
            gen_dev = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, generator=generator, device=gen_dev, dtype=state_dtype).to(x.device)
            x = x + (g2 * h).sqrt().reshape(-1, *([1] * (x.dim() - 1))) * noise
        if return_trajectory:
            traj.append(x)
    return SolverResult(x=x, nfe=f.nfe, trajectory=traj, times=ts)
