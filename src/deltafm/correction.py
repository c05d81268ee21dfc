"""The ΔFM ↔ FM affine map and the mean negative target it needs.

With negatives drawn independently of the anchor, the ΔFM loss E‖v − u‖² − λ E‖v − ũ‖² is minimised
pointwise by

    v_λ(x_t, t, y) = (v_FM(x_t, t, y) − λ ū(t, y)) / (1 − λ),

where v_FM = E[u | x_t, t, y] is the flow-matching optimum and ū = E[ũ] the mean negative target.
For the affine path u = α̇_t x1 + σ̇_t x0, so with the anchor's t (paper Eq. 6)
ū(t, y) = α̇_t m1(y) + σ̇_t m0(y), with m1, m0 the means of the data and source items that can be
drawn as negatives (all items for uniform negatives; items of other classes than y for
different-class negatives).  Inverting, v_FM = (1 − λ) v_λ + λ ū recovers the flow-matching
field from a ΔFM model (:func:`bias_correct`); :func:`to_delta_optimum` maps an FM field to the
ΔFM optimum post hoc.  :class:`MeanTarget` estimates m1, m0 from the training data (a running,
exact average over every sample seen; the objective updates it every step) and is stored with the
model; :class:`BiasCorrection` applies either map at sampling time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import validation_enabled
from .conditioning import Cond, class_ids, null_mask
from .losses import check_lambda
from .paths import ProbPath, get_path

__all__ = ["MeanTarget", "BiasCorrection", "CORRECTION_MODES", "correction_window", "bias_correct", "to_delta_optimum"]


#: Where the bias correction acts at sampling time: nowhere, at every t, or only on the guidance interval
#: of classifier-free guidance (the reference code's "interference reduction", which it applies only
#: when asked, and then only for t inside its guidance interval).
CORRECTION_MODES = ("off", "always", "guidance")


def correction_window(mode: str | bool, interval: tuple[float, float]) -> tuple[float, float] | None:
    """The t-window (inclusive) where the correction applies under ``mode``, or None for nowhere.

    ``mode`` is one of :data:`CORRECTION_MODES` (``True``/``False`` mean ``always``/``off``); ``interval``
    is the CFG interval. ``guidance`` follows the reference sampler: the window is the guidance interval
    whatever the CFG scale (with w = 1 the interval still bounds it).
    """
    mode = {True: "always", False: "off"}.get(mode, mode) if isinstance(mode, bool) else mode
    if mode not in CORRECTION_MODES:
        raise ValueError(f"correction mode must be one of {', '.join(CORRECTION_MODES)}, got {mode!r}")
    if mode == "off":
        return None
    if mode == "guidance":
        return (float(interval[0]), float(interval[1]))
    return (0.0, 1.0)


def bias_correct(v: Tensor, u_bar: Tensor, lam: float) -> Tensor:
    """ΔFM velocity → flow-matching velocity: v_FM = (1 − λ) v_λ + λ ū."""
    lam = check_lambda(lam)
    return (1.0 - lam) * v + lam * u_bar


def to_delta_optimum(v: Tensor, u_bar: Tensor, lam: float) -> Tensor:
    """Flow-matching velocity → the ΔFM optimum: v_λ = (v_FM − λ ū) / (1 − λ)."""
    lam = check_lambda(lam)
    return (v - lam * u_bar) / (1.0 - lam)


class MeanTarget:
    """Running estimate of the data mean m1 and source mean m0, overall and per class.

    ``update(x1, x0, labels, t=..., path=...)`` adds a batch (sums kept in float64, so the
    estimate is the exact average of everything seen, independent of batch order up to
    rounding).  ``u_bar(t, labels, path, ...)`` returns the mean negative target (B, ...).
    Class ids ≥ ``num_classes`` (the null class) use the overall means.

    For ``negative_time="own"`` (the reference code builds each negative's target at its own
    t), ū = E[α̇] m1 + E[σ̇] m0 with the averages of α̇_t, σ̇_t over the training t's, also tracked.
    """

    def __init__(self, num_classes: int | None = None) -> None:
        self.num_classes = num_classes
        self.sum_x1: Tensor | None = None  # (K, D) float64, K = num_classes or 1
        self.sum_x0: Tensor | None = None
        self.count: Tensor | None = None  # (K,) float64
        self.sum_rates = torch.zeros(3, dtype=torch.float64)  # Σα̇, Σσ̇, n over training t
        self.sample_shape: tuple[int, ...] | None = None

    @property
    def initialized(self) -> bool:
        return self.count is not None and float(self.count.sum()) > 0

    def _init(self, x: Tensor) -> None:
        k = self.num_classes or 1
        d = x[0].numel()
        self.sample_shape = tuple(x.shape[1:])
        self.sum_x1 = torch.zeros(k, d, dtype=torch.float64, device=x.device)
        self.sum_x0 = torch.zeros(k, d, dtype=torch.float64, device=x.device)
        self.count = torch.zeros(k, dtype=torch.float64, device=x.device)

    @torch.no_grad()
    def update(
        self,
        x1: Tensor,
        x0: Tensor,
        labels: Tensor | None = None,
        t: Tensor | None = None,
        path: ProbPath | None = None,
    ) -> None:
        """Add a batch of data ``x1``, source ``x0`` (and their training ``t`` under ``path``)."""
        if self.sum_x1 is None:
            self._init(x1)
        assert self.sum_x1 is not None and self.sum_x0 is not None and self.count is not None
        if tuple(x1.shape[1:]) != self.sample_shape:
            raise ValueError(f"MeanTarget tracks samples of shape {self.sample_shape}, got {tuple(x1.shape[1:])}")
        if self.num_classes:
            if labels is None:
                raise ValueError("MeanTarget with num_classes needs labels")
            idx = labels.to(self.count.device).long()
            if validation_enabled() and bool((idx < 0).any() or (idx >= self.num_classes).any()):
                raise ValueError(f"labels must be true class ids in [0, {self.num_classes - 1}]")
        else:
            idx = torch.zeros(x1.shape[0], dtype=torch.long, device=self.count.device)
        self.sum_x1.index_add_(0, idx, x1.detach().flatten(1).to(self.sum_x1))
        self.sum_x0.index_add_(0, idx, x0.detach().flatten(1).to(self.sum_x0))
        self.count.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
        if t is not None and path is not None:
            td = t.detach().double()
            self.sum_rates = self.sum_rates.to(td.device)
            n = torch.full((), float(td.numel()), dtype=torch.float64, device=td.device)
            self.sum_rates += torch.stack([path.d_alpha(td).sum(), path.d_sigma(td).sum(), n])

    def means(self, labels: Tensor | None = None, other_classes: bool = False) -> tuple[Tensor, Tensor]:
        """(m1, m0) of shape (B, D) for ``labels`` (or (1, D) overall when labels is None).

        ``other_classes``: the means over the items whose class differs from each label (the
        mean negative under different-class negatives); the null class gets the overall means.
        """
        if not self.initialized:
            raise RuntimeError("MeanTarget has no data yet: update it during training or estimate it from data")
        assert self.sum_x1 is not None and self.sum_x0 is not None and self.count is not None
        tot1, tot0, n = self.sum_x1.sum(0), self.sum_x0.sum(0), self.count.sum()
        overall1, overall0 = (tot1 / n)[None], (tot0 / n)[None]
        if labels is None:
            return overall1, overall0
        b = labels.shape[0]
        overall1, overall0 = overall1.expand(b, -1), overall0.expand(b, -1)
        if not self.num_classes or not other_classes:
            return overall1, overall0
        lab = labels.to(self.count.device).long()
        is_null = lab >= self.num_classes
        safe = lab.clamp(0, self.num_classes - 1)
        n_other = n - self.count[safe]
        ok = (~is_null) & (n_other > 0)
        denom = torch.where(ok, n_other, torch.ones_like(n_other))[:, None]
        m1 = (tot1[None] - self.sum_x1[safe]) / denom
        m0 = (tot0[None] - self.sum_x0[safe]) / denom
        return torch.where(ok[:, None], m1, overall1), torch.where(ok[:, None], m0, overall0)

    def u_bar(
        self,
        t: Tensor,
        labels: Tensor | None,
        path: ProbPath | str,
        other_classes: bool = False,
        negative_time: str = "anchor",
    ) -> Tensor:
        """Mean negative target ū(t, y) with shape (B, *sample_shape), in t's dtype and device."""
        path = get_path(path)
        m1, m0 = self.means(labels, other_classes)
        b = t.shape[0]
        m1 = m1.expand(b, -1).to(device=t.device, dtype=t.dtype)
        m0 = m0.expand(b, -1).to(device=t.device, dtype=t.dtype)
        if negative_time == "anchor":
            da, ds = path.d_alpha(t)[:, None], path.d_sigma(t)[:, None]
        elif negative_time == "own":
            if float(self.sum_rates[2]) == 0:
                raise RuntimeError("negative_time='own' needs the training t's: update MeanTarget with t and path")
            r = (self.sum_rates[:2] / self.sum_rates[2]).cpu().to(device=t.device, dtype=t.dtype)
            da, ds = r[0].expand(b, 1), r[1].expand(b, 1)
        else:
            raise ValueError(f"negative_time must be 'anchor' or 'own', got {negative_time!r}")
        assert self.sample_shape is not None
        return (da * m1 + ds * m0).reshape(b, *self.sample_shape)

    # -- persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (safetensors-friendly)."""
        if self.sum_x1 is None:
            return {"sum_rates": self.sum_rates.detach().cpu().clone()}
        assert self.sum_x0 is not None and self.count is not None and self.sample_shape is not None
        return {
            "sum_x1": self.sum_x1.detach().cpu().clone(),
            "sum_x0": self.sum_x0.detach().cpu().clone(),
            "count": self.count.detach().cpu().clone(),
            "sum_rates": self.sum_rates.detach().cpu().clone(),
            "sample_shape": torch.tensor(self.sample_shape, dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.sum_rates = state["sum_rates"].to(torch.float64).clone()
        if "sum_x1" not in state:
            self.sum_x1 = self.sum_x0 = self.count = None
            self.sample_shape = None
            return
        k = state["count"].shape[0]
        if (self.num_classes or 1) != k:
            raise ValueError(f"MeanTarget state has {k} class rows, expected {self.num_classes or 1}")
        self.sum_x1 = state["sum_x1"].to(torch.float64).clone()
        self.sum_x0 = state["sum_x0"].to(torch.float64).clone()
        self.count = state["count"].to(torch.float64).clone()
        self.sample_shape = tuple(int(s) for s in state["sample_shape"].tolist())

    def to(self, device: torch.device | str) -> MeanTarget:
        for name in ("sum_x1", "sum_x0", "count", "sum_rates"):
            val = getattr(self, name)
            if val is not None:
                setattr(self, name, val.to(device))
        return self


@dataclass
class BiasCorrection:
    """The ΔFM ↔ FM affine map at sampling time, with ū from a :class:`MeanTarget`.

    ``direction="to_fm"`` turns a ΔFM model into the FM field (the correction);
    ``direction="to_delta"`` turns an FM model into the ΔFM optimum (post-hoc analysis).
    ``other_classes`` must match training with different-class negatives.  With
    ``correct_null=False`` (training that did not contrast label-dropped samples) rows whose
    cond is ``null_class`` are left unchanged: their optimum is plain FM.  ``interval`` (inclusive,
    t = 0 noise) restricts the map to part of the path; elsewhere the velocity passes unchanged
    (see :func:`correction_window`).

    ``cond`` may be class ids, a :class:`~deltafm.conditioning.TextCond` or a
    :class:`~deltafm.conditioning.MultiCond`: class-wise ū reads the ids of part ``label_key`` (the part
    negatives were chosen to differ in); a text has no classes, so ū is the overall mean; the rows left
    unchanged under ``correct_null=False`` are the fully unconditional ones.
    """

    lam: float
    mean_target: MeanTarget
    path: ProbPath | str = "linear"
    other_classes: bool = False
    negative_time: str = "anchor"
    direction: str = "to_fm"
    null_class: int | None = None
    correct_null: bool = True
    interval: tuple[float, float] = (0.0, 1.0)
    label_key: str | None = None

    def __post_init__(self) -> None:
        self.lam = check_lambda(self.lam)
        self.path = get_path(self.path)
        if self.direction not in ("to_fm", "to_delta"):
            raise ValueError(f"direction must be 'to_fm' or 'to_delta', got {self.direction!r}")
        lo, hi = self.interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"correction interval must satisfy 0 <= lo <= hi <= 1, got {self.interval}")
        self.interval = (float(lo), float(hi))

    def u_bar(self, t: Tensor, cond: Tensor | None) -> Tensor:
        return self.mean_target.u_bar(t, cond, self.path, self.other_classes, self.negative_time)

    def __call__(self, v: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        u_bar = self.u_bar(t.to(v.dtype), class_ids(cond, self.label_key)).to(v.dtype)
        out = bias_correct(v, u_bar, self.lam) if self.direction == "to_fm" else to_delta_optimum(v, u_bar, self.lam)
        if not self.correct_null and cond is not None:  # unconditional rows keep the plain FM field
            keep = null_mask(cond, self.null_class).to(v.device)
            out = torch.where(keep.reshape(-1, *([1] * (v.dim() - 1))), v, out)
        if self.interval != (0.0, 1.0):
            lo, hi = self.interval
            inside = ((t >= lo) & (t <= hi)).reshape(-1, *([1] * (v.dim() - 1)))
            out = torch.where(inside, out, v)
        return out
