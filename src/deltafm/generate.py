"""Noise -> solver -> guidance (and correction) -> samples: the engine behind ``deltafm sample``.

For N samples with class labels y (balanced ``i mod K`` by default, or one class), noise x0 ~ N(0, I)
is drawn **per image** from a generator seeded with (seed, image index), so an image does not depend on
the batch size or on how many others are drawn. The velocity is the model under classifier-free
guidance (scale w, on the t-interval [lo, hi]; t = 0 noise, t = 1 data) with an optional affine map
(the ΔFM bias correction v_FM = (1 − λ) v + λ ū, or the post-hoc map to the ΔFM optimum), integrated
from t = 0 to t = 1 by any sampler of the registry :data:`deltafm.solvers.SOLVERS`. The SDE sampler's
noise comes from a generator seeded with (seed, first index of the batch): reproducible for a given seed
and batch size. :func:`generate_batches` yields the batches one by one (``deltafm sample`` streams them
to disk and can skip the batches a killed run finished); :func:`generate` concatenates them.

Which map and which λ a trained checkpoint is sampled with is decided by
:meth:`deltafm.objective.DeltaFMObjective.sampling_correction`; writing images is :mod:`deltafm.images`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .conditioning import Cond, Indexed, cond_to, select
from .conditioning import batch_size as count_conditions
from .correction import BiasCorrection
from .guidance import GuidedVelocity
from .paths import ProbPath
from .seeding import derive_seed, make_generator
from .solvers import get_solver, solve

__all__ = ["labels_for", "initial_noise", "generate_batches", "generate"]


def labels_for(num: int, num_classes: int, class_id: int | None = None) -> Tensor:
    """Class labels of N samples: ``i mod K`` (balanced, in order), or all ``class_id``."""
    if class_id is not None:
        if not 0 <= class_id < num_classes:
            raise ValueError(f"class {class_id} out of range [0, {num_classes - 1}]")
        return torch.full((num,), class_id, dtype=torch.long)
    return torch.arange(num, dtype=torch.long) % num_classes


def initial_noise(start: int, count: int, shape: Sequence[int], seed: int) -> Tensor:
    """x0 of images ``start .. start+count-1``: each from its own generator seeded with (seed, index)."""
    g = torch.Generator()
    out = torch.empty(count, *shape)
    for i in range(count):
        g.manual_seed(derive_seed(seed, start + i, "sample-noise"))
        out[i] = torch.randn(*shape, generator=g)
    return out


@torch.no_grad()  # torch wraps generator functions: grad mode is only off while a batch is computed
def generate_batches(
    model: nn.Module,
    *,
    labels: Cond | Indexed,
    shape: Sequence[int],
    num_classes: int | None,
    solver: str = "euler",
    steps: int = 50,
    cfg: float | Mapping[str, float] = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
    correction: BiasCorrection | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    path: ProbPath | str = "linear",
    amp_dtype: torch.dtype | None = None,
    skip: Collection[int] = (),
) -> Iterator[tuple[int, Tensor]]:
    """``(start, samples)`` batch by batch: images ``start .. start+count-1`` in model space (float32,
    count×C×H×W, on CPU), for batch starts ``0, batch_size, 2·batch_size, ...`` not in ``skip``.

    A batch is the same whether or not the others are drawn (per-image noise, SDE noise seeded with the
    batch start), so skipping finished batches and drawing the rest gives what one pass gives, and so do
    several processes that each draw a disjoint share (``deltafm sample`` under torchrun).

    ``labels`` is any condition of :mod:`deltafm.conditioning` (class ids, a TextCond, a MultiCond; then
    ``num_classes`` is not used and ``cfg`` may give one weight per part), or an :class:`~deltafm.conditioning.Indexed`
    table of them (each batch gathers its rows: N samples of P prompts never hold N encoded texts).
    """
    spec = get_solver(solver)
    device = torch.device(device)
    n = count_conditions(labels)
    skip = set(skip)
    for start in range(0, n, batch_size):
        if start in skip:
            continue
        count = min(batch_size, n - start)
        x0 = initial_noise(start, count, shape, seed).to(device)
        cond = cond_to(select(labels, slice(start, start + count)), device)
        vel = GuidedVelocity(model, cond, scale=cfg, interval=interval, null_class=num_classes,
                             correction=correction, amp_dtype=amp_dtype)
        gen = make_generator(seed, start, "sample-sde", device) if spec.kind == "sde" else None
        res = solve(vel, x0, solver, steps, path=path, generator=gen)
        yield start, res.x.float().cpu()


@torch.no_grad()
def generate(
    model: nn.Module,
    *,
    labels: Cond | Indexed,
    shape: Sequence[int],
    num_classes: int | None,
    solver: str = "euler",
    steps: int = 50,
    cfg: float | Mapping[str, float] = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
    correction: BiasCorrection | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    path: ProbPath | str = "linear",
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Tensor:
    """Samples in model space (float32, N×C×H×W, on CPU) for ``labels`` (N conditions), all in memory (see
    :func:`generate_batches` to stream them)."""
    n = count_conditions(labels)
    outs = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="img", desc=f"sampling ({solver}, {steps} steps)", dynamic_ncols=True)
    for _, x in generate_batches(model, labels=labels, shape=shape, num_classes=num_classes, solver=solver,
                                 steps=steps, cfg=cfg, interval=interval, correction=correction, seed=seed,
                                 batch_size=batch_size, device=device, path=path, amp_dtype=amp_dtype):
        outs.append(x)
        if bar is not None:
            bar.update(x.shape[0])
    if bar is not None:
        bar.close()
    return torch.cat(outs) if outs else torch.empty(0, *shape)
