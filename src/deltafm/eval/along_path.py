"""Class separation along the path (the analogue of the ΔFM paper's Fig. 4).

The question: how early along t (t = 0 noise, t = 1 data) does the model's *predicted clean sample*
look like its class?  For a velocity v = v_θ(x_t, t, c) on an affine path x_t = α_t x1 + σ_t x0, the
predicted data point is

    x̂1 = (σ̇_t x_t − σ_t v) / (α_t σ̇_t − σ_t α̇_t)          (``path.velocity_to_data``)

(for the linear path, x̂1 = x_t + (1 − t) v).  We feed x̂1, clipped to the data range [−1, 1], to the
project's classifier and report the fraction classified as the intended class y, at each t.

Three views, all with fixed seeds so that FM and ΔFM see the same noise and the same images:

* ``trajectory``: along the model's own Euler sampling path from x0 ~ N(0, I), conditioned on y
  (x̂1 at each grid time; at t = 1 it is the sample itself);
* ``noised_class``: on test images x1 of class y, x_t = α_t x1 + σ_t x0, conditioned on y;
* ``noised_null``: the same x_t with the null (unconditional) label: does the model infer the class
  from x_t alone?  At t = 0 this is chance; it measures separation without the label's help.

A ΔFM model may be evaluated raw (its field v_λ = (v_FM − λ ū)/(1 − λ) extrapolates away from the mean
target, which makes x̂1 more distinct) or with the bias correction (``correction``), which maps it back
to the flow-matching field.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from deltafm.correction import BiasCorrection
from deltafm.generate import initial_noise
from deltafm.guidance import GuidedVelocity
from deltafm.paths import ProbPath, get_path

__all__ = ["predicted_clean", "accuracy_of", "noised_accuracy", "trajectory_accuracy"]


def predicted_clean(v: Tensor, x_t: Tensor, t: Tensor, path: ProbPath | str = "linear") -> Tensor:
    """x̂1 = path.velocity_to_data(v, x_t, t): the clean sample a velocity points at."""
    return get_path(path).velocity_to_data(v, x_t, t)


@torch.no_grad()
def accuracy_of(classifier: nn.Module, x: Tensor, labels: Tensor) -> float:
    """Fraction of images x (model space, clipped to [−1, 1]) that ``classifier`` assigns to ``labels``."""
    logits = classifier(x.clamp(-1.0, 1.0).float())
    return float((logits.argmax(1).cpu() == labels.cpu()).float().mean())


def _noise(count: int, shape: Sequence[int], seed: int, start: int = 0) -> Tensor:
    return initial_noise(start, count, shape, seed)


@torch.no_grad()
def noised_accuracy(
    model: nn.Module,
    classifier: nn.Module,
    x1: Tensor,
    labels: Tensor,
    times: Sequence[float],
    *,
    num_classes: int,
    path: ProbPath | str = "linear",
    null_label: bool = False,
    correction: BiasCorrection | None = None,
    seed: int = 0,
    batch_size: int = 250,
    amp_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Accuracy of x̂1 on noised real images x_t = α_t x1 + σ_t x0, for each t in ``times``.

    ``x1``: model-space images (N, C, H, W); ``labels``: their classes (N,). The model is conditioned
    on ``labels`` or, with ``null_label``, on the null class ``num_classes``. The noise x0 of image i is
    drawn from a generator seeded with (seed, i), identical for every model and every t.
    """
    path = get_path(path)
    n = x1.shape[0]
    correct = torch.zeros(len(times))
    for start in range(0, n, batch_size):
        xb = x1[start:start + batch_size].to(device)
        yb = labels[start:start + batch_size].to(device)
        x0 = _noise(xb.shape[0], xb.shape[1:], seed, start).to(device)
        cond = torch.full_like(yb, num_classes) if null_label else yb
        vel = GuidedVelocity(model, cond, correction=correction, amp_dtype=amp_dtype)
        for k, tv in enumerate(times):
            t = torch.full((xb.shape[0],), float(tv), device=device)
            x_t = path.sample(xb, x0, t).x_t
            x_hat = predicted_clean(vel(x_t, t), x_t, t, path)
            correct[k] += accuracy_of(classifier, x_hat, yb) * xb.shape[0]
    return (correct / n).tolist()


@torch.no_grad()
def trajectory_accuracy(
    model: nn.Module,
    classifier: nn.Module,
    labels: Tensor,
    shape: Sequence[int],
    *,
    num_classes: int,
    steps: int = 20,
    path: ProbPath | str = "linear",
    correction: BiasCorrection | None = None,
    seed: int = 0,
    batch_size: int = 250,
    amp_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> tuple[list[float], list[float]]:
    """Accuracy of x̂1 along the model's own Euler path x_{k+1} = x_k + h v(x_k, t_k), t_k = k / steps.

    Returns ``(times, accuracies)`` with ``steps + 1`` entries: x̂1 at t_0 .. t_{steps−1}, then the final
    sample at t = 1. The initial noise is the one ``deltafm.generate.generate`` uses for the same seed.
    """
    del num_classes  # conditioning is on the given labels; kept for a uniform signature
    path = get_path(path)
    n = labels.shape[0]
    times = [k / steps for k in range(steps + 1)]
    correct = torch.zeros(steps + 1)
    h = 1.0 / steps
    for start in range(0, n, batch_size):
        yb = labels[start:start + batch_size].to(device)
        x = _noise(yb.shape[0], shape, seed, start).to(device)
        vel = GuidedVelocity(model, yb, correction=correction, amp_dtype=amp_dtype)
        for k in range(steps):
            t = torch.full((yb.shape[0],), times[k], device=device)
            v = vel(x, t)
            correct[k] += accuracy_of(classifier, predicted_clean(v, x, t, path), yb) * yb.shape[0]
            x = x + h * v
        correct[steps] += accuracy_of(classifier, x, yb) * yb.shape[0]
    return times, (correct / n).tolist()
