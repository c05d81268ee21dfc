"""Negative samplers: for each anchor i, the index j(i) of its negative in a pool.

The pool is the local batch, or the batch gathered from all DDP ranks (a larger pool of
negatives; the paper finds that larger negative pools help).  Every sampler returns an
explicit LongTensor of indices so that tests and users can inspect or pass their own.

* ``uniform``        — j ≠ i uniform over the other items, independently per anchor (the
                      reference code's rule; here in O(B) memory as j = (i + k) mod M, k ~ U{1..M−1}).
* ``derangement``    — a uniformly random permutation without fixed points (each item is used
                      as a negative exactly once).
* ``different_class``— j uniform over the items whose label differs from the anchor's.  If the
                      whole pool holds one class, ``fallback="uniform"`` draws among the other
                      items (same class), ``fallback="error"`` raises.
* ``hard``           — the nearest other item in L2 (optionally among other classes only), mined on
                      the targets u (``mine_on="u"``, the default) or on the clean data x1
                      (``mine_on="x1"``: "the most similar other image", independent of the noise that
                      dominates u at the batch sizes used here).

Negatives drawn independently of the anchor (``uniform``, ``derangement``, ``different_class``)
keep the closed-form optimum v_λ = (v_FM − λ ū)/(1 − λ) that the bias correction inverts; ``hard``
negatives depend on the anchor's target, so the correction is then only approximate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "NEGATIVE_KINDS",
    "uniform_negatives",
    "derangement_negatives",
    "different_class_negatives",
    "hard_negatives",
    "gather_across_ranks",
    "NegativePool",
    "NegativeSampler",
]

NEGATIVE_KINDS = ("uniform", "derangement", "different_class", "hard")


def _gen_device(generator: torch.Generator | None, device) -> torch.device | str | None:
    return generator.device if generator is not None else device


def _anchor_positions(batch_size: int, offset: int, device) -> Tensor:
    return torch.arange(offset, offset + batch_size, device=device)


def uniform_negatives(
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    pool_size: int | None = None,
    offset: int = 0,
) -> Tensor:
    """For each anchor, a negative drawn uniformly among the *other* items of the pool.

    Anchor i sits at position ``offset + i`` of a pool of ``pool_size`` items (default: the batch
    itself).  j = (offset + i + k) mod M with k uniform on {1, …, M − 1} is uniform over the
    M − 1 other positions, independently per anchor.
    """
    m = batch_size if pool_size is None else pool_size
    if m < 2:
        raise ValueError(f"need at least 2 items to draw a negative other than the anchor, got {m}")
    if not 0 <= offset <= m - batch_size:
        raise ValueError(f"anchors [{offset}, {offset + batch_size}) do not fit in a pool of {m}")
    k = torch.randint(1, m, (batch_size,), generator=generator, device=_gen_device(generator, device))
    k = k.to(device)
    return (_anchor_positions(batch_size, offset, k.device) + k) % m


def derangement_negatives(
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    max_tries: int = 10_000,
) -> Tensor:
    """A uniformly random derangement (permutation with no fixed point) of range(batch_size).

    Rejection sampling: a uniform permutation is a derangement with probability → 1/e, so the
    expected number of draws is about e; the result is uniform over all derangements.
    """
    if batch_size < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {batch_size}")
    ar = torch.arange(batch_size, device=_gen_device(generator, device))
    for _ in range(max_tries):
        perm = torch.randperm(batch_size, generator=generator, device=_gen_device(generator, device))
        if not bool((perm == ar).any()):
            return perm.to(device)
    raise RuntimeError(f"no derangement found in {max_tries} draws (should not happen)")  # pragma: no cover


def different_class_negatives(
    labels: Tensor,
    generator: torch.Generator | None = None,
    pool_labels: Tensor | None = None,
    offset: int = 0,
    fallback: str = "uniform",
) -> Tensor:
    """For each anchor, a negative uniform among pool items of a *different* class.

    O(M log M): sort the pool by label; the items of other classes than y are the sorted
    positions outside y's segment [start_y, start_y + count_y), so a uniform r ∈ [0, M − count_y)
    maps to position r (if r < start_y) or r + count_y.

    If the pool holds a single class, ``fallback="uniform"`` draws among the other items (same
    class, as the reference code allows), ``fallback="error"`` raises ValueError (the only case that
    reads tensor values; the default path never synchronises a GPU with the host).
    """
    if fallback not in ("uniform", "error"):
        raise ValueError(f"fallback must be 'uniform' or 'error', got {fallback!r}")
    if labels.dim() != 1:
        raise ValueError(f"labels must have shape (B,), got {tuple(labels.shape)}")
    pool = labels if pool_labels is None else pool_labels
    b, m = labels.shape[0], pool.shape[0]
    device = labels.device
    sorted_labels, order = torch.sort(pool, stable=True)
    # segment of each anchor's class in the sorted pool
    start = torch.searchsorted(sorted_labels, labels, right=False)
    end = torch.searchsorted(sorted_labels, labels, right=True)
    count = end - start
    n_other = m - count
    if fallback == "error" and bool((n_other == 0).any()):  # a value check: a host sync, only when asked
        raise ValueError("different_class negatives: the pool holds a single class")
    u = torch.rand(b, generator=generator, device=_gen_device(generator, device), dtype=torch.float64).to(device)
    r = torch.minimum((u * n_other).long(), n_other - 1)
    pos = torch.where(r < start, r, r + count)
    picked = order[pos.clamp(0, m - 1)]
    # single-class pool (n_other = 0 for every anchor): uniform over the other items, from the same draw u,
    # chosen with torch.where so that no tensor value decides the control flow (no host sync)
    k = 1 + torch.minimum((u * (m - 1)).long(), torch.full_like(r, m - 2))
    same_class = (_anchor_positions(b, offset, device) + k) % m
    return torch.where(n_other > 0, picked, same_class)


def hard_negatives(
    targets: Tensor,
    labels: Tensor | None = None,
    other_class_only: bool = False,
    pool: Tensor | None = None,
    pool_labels: Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """For each anchor, the other pool item whose target is nearest in L2 (hard-negative mining).

    With ``other_class_only`` (needs labels), only items of another class qualify; if none does
    (single-class pool) the nearest other item is used.  Deterministic; O(B·M) distances.
    """
    pool_t = targets if pool is None else pool
    b, m = targets.shape[0], pool_t.shape[0]
    if m < 2:
        raise ValueError(f"need at least 2 items for hard negatives, got {m}")
    a = targets.detach().flatten(1).float()
    p = pool_t.detach().flatten(1).float()
    d = torch.cdist(a, p)
    self_pos = _anchor_positions(b, offset, d.device)
    d[torch.arange(b, device=d.device), self_pos] = float("inf")
    if other_class_only:
        if labels is None:
            raise ValueError("hard negatives with other_class_only=True need labels")
        pl = labels if pool_labels is None else pool_labels
        same = labels[:, None] == pl[None, :]
        masked = d.masked_fill(same, float("inf"))
        has_other = torch.isfinite(masked).any(dim=1, keepdim=True)
        d = torch.where(has_other, masked, d)
    return d.argmin(dim=1)


def gather_across_ranks(x: Tensor) -> tuple[Tensor, int]:
    """All-gather ``x`` (B, ...) from every rank (equal B per rank); returns (pool, offset).

    ``offset`` is this rank's first position in the pool.  Without an initialised process group
    (or with one rank) the pool is ``x`` itself and the offset 0.  Not differentiable: use it for
    targets and labels, which carry no gradient.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0), rank * x.shape[0]


@dataclass
class NegativePool:
    """The items negatives are drawn from: per-sample tensors of the local or gathered batch.

    ``tensors`` maps names ("u", "x1", "x0", ...) to (M, ...) tensors; ``labels`` is (M,) or None;
    this rank's anchors sit at positions ``offset .. offset + B − 1``.
    """

    tensors: dict[str, Tensor]
    labels: Tensor | None
    offset: int
    size: int


class NegativeSampler:
    """Chooses negatives for a batch, from the local batch or the batch gathered across ranks.

    Two steps, so that the caller gathers once and indexes once:

    * :meth:`pool` gathers the per-sample tensors the caller needs (one all-gather for all of them,
      one more for the labels when the rule needs labels) into a :class:`NegativePool`;
    * :meth:`indices` draws j(i) (B,), positions in that pool.

    ``sampler(targets, labels, generator)`` does both for a pool of ``targets`` and returns the indices.
    """

    def __init__(
        self, kind: str = "uniform", gather: bool = False, fallback: str = "uniform", other_class_only: bool = False,
        mine_on: str = "u",
    ) -> None:
        if kind not in NEGATIVE_KINDS:
            raise ValueError(f"unknown negative sampler {kind!r}; known: {list(NEGATIVE_KINDS)}")
        if mine_on not in ("u", "x1"):
            raise ValueError(f"hard negatives are mined on 'u' (targets) or 'x1' (data), got {mine_on!r}")
        if kind == "derangement" and gather:
            raise ValueError("derangement negatives are defined on the local batch only; use 'uniform' with gather")
        self.kind = kind
        self.gather_enabled = gather
        self.fallback = fallback
        self.other_class_only = other_class_only
        self.mine_on = mine_on

    @property
    def needs_labels(self) -> bool:
        """Whether the rule reads class labels (different-class, or hard negatives among other classes)."""
        return self.kind == "different_class" or self.other_class_only

    def pool(self, tensors: dict[str, Tensor], labels: Tensor | None = None) -> NegativePool:
        """The pool of ``tensors`` (all of one shape and dtype) and of ``labels`` (when the rule needs them)."""
        names = list(tensors)
        pool_labels = labels if self.needs_labels else None
        if not self.gather_enabled:
            return NegativePool(dict(tensors), pool_labels, 0, tensors[names[0]].shape[0])
        stacked = torch.stack([tensors[n] for n in names], 1)  # (B, k, ...): one all-gather for all k tensors
        gathered, offset = gather_across_ranks(stacked)
        out = {n: gathered[:, k] for k, n in enumerate(names)}
        if pool_labels is not None:
            pool_labels, _ = gather_across_ranks(pool_labels)
        return NegativePool(out, pool_labels, offset, gathered.shape[0])

    def indices(
        self,
        pool: NegativePool,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
        targets: Tensor | None = None,
        batch_size: int | None = None,
    ) -> Tensor:
        """j(i) for the B anchors (positions in ``pool``); hard negatives need ``targets`` (the anchors' tensor
        they are mined on, u or x1 per ``mine_on``) and the pool entry of that name."""
        b = batch_size if batch_size is not None else (labels.shape[0] if labels is not None else targets.shape[0])
        device = next(iter(pool.tensors.values())).device
        if self.kind == "uniform":
            return uniform_negatives(b, generator, device, pool_size=pool.size, offset=pool.offset)
        if self.kind == "derangement":
            return derangement_negatives(b, generator, device)
        if self.kind == "different_class":
            if labels is None:
                raise ValueError("different_class negatives need class labels")
            return different_class_negatives(labels, generator, pool.labels, pool.offset, self.fallback)
        if targets is None or self.mine_on not in pool.tensors:
            raise ValueError(f"hard negatives need the anchors' {self.mine_on!r} and a pool entry {self.mine_on!r}")
        return hard_negatives(targets, labels, self.other_class_only, pool.tensors[self.mine_on], pool.labels,
                              pool.offset)

    def __call__(
        self,
        targets: Tensor,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Indices j(i) into the (local or gathered) pool of ``targets`` (hard negatives: mined on them)."""
        pool = self.pool({self.mine_on: targets}, labels)
        return self.indices(pool, labels, generator, targets=targets, batch_size=targets.shape[0])

    def __repr__(self) -> str:
        return f"NegativeSampler(kind={self.kind!r}, gather={self.gather_enabled})"
