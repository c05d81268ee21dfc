"""Schedules of the contrastive weight λ over training progress (images seen).

λ must stay in [0, 1) at every point (see :func:`deltafm.losses.check_lambda`).  Kinds:

* ``constant``: λ(p) = end
* ``linear``:   λ(p) = start + (end − start) · min(p / duration, 1)      (warm-up or decay)
* ``cosine``:   λ(p) = end + (start − end) · ½ (1 + cos(π · min(p / duration, 1)))

An adaptive / scheduled λ is listed as future work in the paper; these are the simple forms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .losses import check_lambda

__all__ = ["LambdaSchedule", "as_schedule", "check_lambda"]

_KINDS = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class LambdaSchedule:
    """λ as a function of progress ``p`` (images seen); call the schedule with ``p``."""

    kind: str = "constant"
    end: float = 0.05
    start: float = 0.0
    duration: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown lambda schedule {self.kind!r}; known: {list(_KINDS)}")
        check_lambda(self.end)
        check_lambda(self.start)
        if self.kind != "constant" and not self.duration > 0:
            raise ValueError(f"a {self.kind} lambda schedule needs duration > 0 (in images), got {self.duration}")

    def __call__(self, progress: float) -> float:
        if self.kind == "constant":
            return self.end
        frac = min(max(float(progress) / self.duration, 0.0), 1.0)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * frac
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * frac))

    @classmethod
    def constant(cls, lam: float) -> LambdaSchedule:
        return cls("constant", end=lam)


def as_schedule(lam: float | LambdaSchedule) -> LambdaSchedule:
    """A float becomes a constant schedule; a schedule passes through."""
    if isinstance(lam, LambdaSchedule):
        return lam
    return LambdaSchedule.constant(lam)
