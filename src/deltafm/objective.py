"""The training objective: path + t sampler + label dropout + negatives + λ, in one object.

One call does, for a batch of data x1 (B, ...) with labels y::

    t  ~ time sampler                       x0 ~ N(0, I) (or the given source samples)
    x_t = α_t x1 + σ_t x0,  u = α̇_t x1 + σ̇_t x0
    c  = y, with each label replaced by the null id (= num_classes) with prob. label_dropout
    v  = model(x_t, t, c)                   (one forward pass)
    pool = gather(u) or gather(x1, x0)       (once; the local batch unless negatives are gathered)
    j  = negatives(pool, y)                 (indices into the pool)
    ũ  = α̇_t x1[j] + σ̇_t x0[j]             (negative_time="anchor", paper Eq. 6)
       or u[j]                              (negative_time="own", reference code; same for linear)
    loss = mean_i [ (1/D)‖v_i − u_i‖² − λ (1/D)‖v_i − ũ_i‖² ]   (aligned form: no host sync)
         + c_REPA · L_REPA(h_φ(tokens of block k), encoder tokens of x1)   (only when targets are given)

Label dropout is per sample and done here, so the loss knows which samples are unconditional;
``contrast_unconditional=False`` drops the negative term for them (the reference contrasts them).
The running means of x1 and x0 (:class:`~deltafm.guidance.MeanTarget`) are updated on every
call, for the bias correction at sampling time; :meth:`DeltaFMObjective.sampling_correction` decides
which map and which λ a model trained with this objective is sampled with.

REPA (:mod:`deltafm.alignment`): given ``align_targets`` (one (B, N, D_e) tensor of encoder tokens per
projector), the model is called as ``model(x_t, t, c, align=True)`` (an
:class:`~deltafm.alignment.AlignedModel`), still one forward pass, and ``align_coeff · L_REPA`` is added
to the loss. It acts on the same x_t, t and c as the velocity loss, so it composes with every path,
negative kind, λ schedule and label dropout; without targets the computation is exactly the one above.

**Conditioning** (:mod:`deltafm.conditioning`): ``conditioning="class"`` (class ids, as above),
``"text"`` (a :class:`~deltafm.conditioning.TextCond` per batch; dropout nulls the text) or ``"multi"``
(a :class:`~deltafm.conditioning.MultiCond`; each part dropped on its own with its rate, then all parts
together with ``joint_dropout``). Negatives stay over the batch; with several conditions,
``contrast_on`` names the part whose class ids different-class / hard-other-class negatives and the
class-wise ū use (negatives "that differ in a named condition"). Class conditioning takes exactly the
path it always took.

Class-id range checks read tensor values (a host sync on a GPU); they run unless the caller is inside
:func:`deltafm.checks.validation_disabled` (the training loop validates its data once instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .alignment import alignment_loss
from .checks import validation_enabled
from .conditioning import Cond, Labels, MultiCond, TextCond, batch_size, class_ids, drop_condition
from .correction import BiasCorrection, MeanTarget
from .losses import check_lambda, contrastive_loss_parts, flow_matching_loss
from .negatives import NEGATIVE_KINDS, NegativeSampler
from .paths import LinearPath, PathSample, ProbPath, get_path
from .schedules import LambdaSchedule, as_schedule
from .timesteps import TimeSampler, get_time_sampler

__all__ = ["DeltaFMObjective", "ObjectiveOutput"]


@dataclass
class ObjectiveOutput:
    """``loss`` (scalar, with grad) and ``parts`` (detached scalar tensors, for logging:
    "loss" (the total), "positive" (= FM loss), "negative", "lam", and "repa" when REPA targets were
    given), plus the pieces of the step."""

    loss: Tensor
    parts: dict[str, Tensor]
    pred: Tensor
    sample: PathSample
    cond: Cond | None
    dropped: Tensor | None
    neg_index: Tensor | None


class DeltaFMObjective:
    """Flow matching (λ = 0 or ``negatives="none"``) or ΔFM, as a callable objective.

    Args:
        path: ``linear`` (default), ``cosine``/``gvp``, ``vp`` or a :class:`ProbPath`.
        time_sampler: ``uniform``, ``logit_normal``, ``mode`` or a :class:`TimeSampler`.
        lam: λ ∈ [0, 1) or a :class:`LambdaSchedule` of images seen.
        negatives: ``uniform`` (reference), ``derangement``, ``different_class``, ``hard`` or ``none``.
        gather_negatives: draw negatives from the batch gathered across all DDP ranks.
        num_classes: number of classes (the null id is ``num_classes``); None = unconditional.
        label_dropout: per-sample probability of replacing the label by the null id (CFG).
        contrast_unconditional: apply the contrastive term to label-dropped samples too.
        negative_time: ``anchor`` (ũ at the anchor's t) or ``own`` (ũ = u_j at its own t).
        hard_other_class: with ``hard`` negatives, only mine among other classes.
        hard_on: with ``hard`` negatives, the tensor they are mined on: ``"u"`` (the targets) or ``"x1"`` (the
            data; independent of the noise x0).
        track_mean: keep the running data/source means for the bias correction.
        align_coeff: weight of the REPA term (REPA's ``proj_coeff``); used when a call gives
            ``align_targets``.
        conditioning: ``class`` (class ids), ``text`` (TextCond) or ``multi`` (MultiCond).
        condition_dropout: ``multi`` only: dropout rate per part name (parts not named use
            ``label_dropout``).
        joint_dropout: ``text``/``multi``: probability of nulling every part of a sample at once, after
            the per-part draws.
        contrast_on: ``multi`` only: the Labels part that class-wise negatives and ū refer to
            (``num_classes`` is then that part's number of values).
    """

    def __init__(
        self,
        path: str | ProbPath = "linear",
        time_sampler: str | TimeSampler = "uniform",
        lam: float | LambdaSchedule = 0.05,
        negatives: str = "uniform",
        gather_negatives: bool = False,
        num_classes: int | None = None,
        label_dropout: float = 0.1,
        contrast_unconditional: bool = True,
        negative_time: str = "anchor",
        hard_other_class: bool = False,
        hard_on: str = "u",
        track_mean: bool = True,
        time_sampler_kwargs: dict[str, float] | None = None,
        align_coeff: float = 0.0,
        conditioning: str = "class",
        condition_dropout: dict[str, float] | None = None,
        joint_dropout: float = 0.0,
        contrast_on: str | None = None,
    ) -> None:
        if conditioning not in ("class", "text", "multi"):
            raise ValueError(f"conditioning must be 'class', 'text' or 'multi', got {conditioning!r}")
        if conditioning != "multi" and (condition_dropout or contrast_on is not None):
            raise ValueError("condition_dropout and contrast_on need conditioning='multi'")
        if conditioning == "class" and joint_dropout:
            raise ValueError("joint_dropout needs conditioning='text' or 'multi' (class ids use label_dropout)")
        class_wise = negatives == "different_class" or (negatives == "hard" and hard_other_class)
        if conditioning == "text" and (class_wise or num_classes):
            raise ValueError("a text has no class ids: use uniform, derangement or hard negatives and no num_classes")
        if conditioning == "multi" and (class_wise or num_classes) and contrast_on is None:
            raise ValueError("class-wise negatives or num_classes with several conditions need contrast_on (the "
                             "class-id part the negatives must differ in)")
        if not 0.0 <= joint_dropout < 1.0:
            raise ValueError(f"joint_dropout must be in [0, 1), got {joint_dropout}")
        self.conditioning = conditioning
        self.condition_dropout = dict(condition_dropout or {})
        self.joint_dropout = float(joint_dropout)
        self.contrast_on = contrast_on
        self.path = get_path(path)
        self.time_sampler = get_time_sampler(time_sampler, **(time_sampler_kwargs or {}))
        self.lam_schedule = as_schedule(lam)
        if negatives != "none" and negatives not in NEGATIVE_KINDS:
            raise ValueError(f"unknown negatives {negatives!r}; known: {['none', *NEGATIVE_KINDS]}")
        if negatives == "different_class" and not num_classes:
            raise ValueError("different_class negatives need num_classes")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        if label_dropout > 0 and not num_classes and conditioning == "class":
            raise ValueError("label_dropout > 0 needs num_classes (the null class id is num_classes)")
        if negative_time not in ("anchor", "own"):
            raise ValueError(f"negative_time must be 'anchor' or 'own', got {negative_time!r}")
        self.negatives = negatives
        self.negative_sampler = (
            NegativeSampler(negatives, gather=gather_negatives, other_class_only=hard_other_class, mine_on=hard_on)
            if negatives != "none"
            else None
        )
        self.num_classes = num_classes
        self.label_dropout = float(label_dropout)
        self.contrast_unconditional = contrast_unconditional
        self.negative_time = negative_time
        self.track_mean = track_mean
        self.mean_target = MeanTarget(num_classes)
        if not align_coeff >= 0.0:
            raise ValueError(f"align_coeff must be >= 0, got {align_coeff}")
        self.align_coeff = float(align_coeff)

    @property
    def null_class(self) -> int | None:
        return self.num_classes

    def lam_at(self, progress: float) -> float:
        """λ at ``progress`` images seen (0 when negatives are off)."""
        return 0.0 if self.negative_sampler is None else self.lam_schedule(progress)

    def drop_labels(
        self, labels: Cond | None, generator: torch.Generator | None = None
    ) -> tuple[Cond | None, Tensor | None]:
        """Per-sample label dropout: returns (cond, dropped_mask); for a text or several conditions, see
        :func:`deltafm.conditioning.drop_condition` (the mask marks fully unconditional samples)."""
        if labels is None:
            return None, None
        if not isinstance(labels, Tensor):
            assert isinstance(labels, TextCond | MultiCond)
            rate: float | dict[str, float] = self.label_dropout
            if isinstance(labels, MultiCond):
                rate = {n: self.condition_dropout.get(n, self.label_dropout) for n in labels.names}
            return drop_condition(labels, rate, self.joint_dropout, generator)
        if self.num_classes is not None and validation_enabled():
            bad = (labels < 0) | (labels >= self.num_classes)
            if bool(bad.any()):
                raise ValueError(
                    f"labels must be class ids in [0, {self.num_classes - 1}], got {labels[bad][:5].tolist()}"
                )
        if self.label_dropout == 0.0:
            return labels, torch.zeros_like(labels, dtype=torch.bool)
        gen_dev = generator.device if generator is not None else labels.device
        dropped = (torch.rand(labels.shape[0], generator=generator, device=gen_dev) < self.label_dropout).to(
            labels.device
        )
        return torch.where(dropped, torch.full_like(labels, self.num_classes), labels), dropped

    def _negative_targets(self, sample: PathSample, labels: Tensor | None, generator) -> tuple[Tensor, Tensor]:
        """(j, ũ): indices into the pool and the negative targets aligned with the anchors.

        With ``own`` time (or the linear path, where both agree) ũ_i = u_{j(i)} from a pool of targets;
        with ``anchor`` time ũ_i = α̇_t x1_{j(i)} + σ̇_t x0_{j(i)} at the anchor's t, from a pool of
        (x1, x0). The pool is gathered once (hard negatives also need the pool's targets u).
        """
        sampler = self.negative_sampler
        assert sampler is not None
        own = self.negative_time == "own" or isinstance(self.path, LinearPath)
        wanted = {"u": sample.u} if own else {"x1": sample.x1, "x0": sample.x0}
        mined = sample.x1 if sampler.mine_on == "x1" else sample.u
        if sampler.kind == "hard":
            wanted[sampler.mine_on] = mined
        pool = sampler.pool(wanted, labels)
        idx = sampler.indices(pool, labels, generator, targets=mined, batch_size=sample.u.shape[0])
        if own:
            return idx, pool.tensors["u"].index_select(0, idx)
        x1, x0 = pool.tensors["x1"].index_select(0, idx), pool.tensors["x0"].index_select(0, idx)
        return idx, self.path.target(x1, x0, sample.t)

    def __call__(
        self,
        model: nn.Module,
        x1: Tensor,
        labels: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        progress: float = 0.0,
        noise: Tensor | None = None,
        t: Tensor | None = None,
        align_targets: list[Tensor] | None = None,
    ) -> ObjectiveOutput:
        """Compute the loss for a batch; ``noise`` / ``t`` override the random draws. With ``align_targets``
        (encoder tokens of x1, one (B, N, D_e) tensor per projector) the REPA term is added and
        ``parts["repa"]`` reports it."""
        b = x1.shape[0]
        labels = self._check_cond(labels, b)
        if t is None:
            t = self.time_sampler.sample(b, generator=generator, device=x1.device, dtype=x1.dtype)
        if noise is None:
            gen_dev = generator.device if generator is not None else x1.device
            noise = torch.randn(x1.shape, generator=generator, device=gen_dev, dtype=x1.dtype).to(x1.device)
        sample = self.path.sample(x1, noise, t)
        cond, dropped = self.drop_labels(labels, generator)
        if not isinstance(labels, Tensor):  # the ids negatives and ū are class-wise over (None for a text)
            labels = class_ids(labels, self.contrast_on)
        projected = None
        if align_targets is None:
            pred = model(sample.x_t, t, cond)
        else:
            pred, projected = model(sample.x_t, t, cond, align=True)
        if pred.shape != x1.shape:
            raise ValueError(f"model output shape {tuple(pred.shape)} differs from the input shape {tuple(x1.shape)}")
        lam = self.lam_at(progress)
        target = sample.u.to(pred.dtype)
        neg_index = None
        if self.negative_sampler is None:
            positive = flow_matching_loss(pred.float(), target.float(), reduction="none", check_finite=False)
            negative = torch.zeros_like(positive)
            per_sample = positive
        else:
            neg_index, negative_target = self._negative_targets(sample, labels, generator)
            parts = contrastive_loss_parts(pred.float(), target.float(), negative_target.float(), lam)
            positive, negative, per_sample = parts.positive, parts.negative, parts.loss
            if not self.contrast_unconditional and dropped is not None:
                per_sample = torch.where(dropped, positive, per_sample)
        loss = per_sample.mean()
        repa = None
        if projected is not None:
            assert align_targets is not None
            repa = alignment_loss(projected, align_targets)
            loss = loss + self.align_coeff * repa
        if self.track_mean:
            self.mean_target.update(x1, noise, labels if self.num_classes else None, t, self.path)
        parts_out = {
            "loss": loss.detach(),
            "positive": positive.detach().mean(),
            "negative": negative.detach().mean(),
            "lam": torch.tensor(lam),
        }
        if repa is not None:
            parts_out["repa"] = repa.detach()
        return ObjectiveOutput(loss, parts_out, pred, sample, cond, dropped, neg_index)

    def _check_cond(self, labels: Cond | None, b: int) -> Cond | None:
        """The batch's condition, checked against ``conditioning`` and the batch size."""
        if labels is None:
            return None
        kind = ("class" if isinstance(labels, Tensor) else "text" if isinstance(labels, TextCond)
                else "multi" if isinstance(labels, MultiCond) else type(labels).__name__)
        if kind != self.conditioning:
            raise ValueError(f"this objective is for {self.conditioning} conditioning, got a "
                             f"{type(labels).__name__} ({kind} conditioning)")
        if isinstance(labels, Tensor):
            if labels.shape != (b,):
                raise ValueError(f"labels must have shape ({b},), got {tuple(labels.shape)}")
            return labels
        if batch_size(labels) != b:
            raise ValueError(f"the condition describes {batch_size(labels)} samples, the batch has {b}")
        if isinstance(labels, MultiCond) and self.contrast_on is not None:
            part = labels[self.contrast_on]
            if not isinstance(part, Labels):
                raise ValueError(f"contrast_on={self.contrast_on!r} must name class ids, not a text")
            if self.num_classes is not None and part.num_classes != self.num_classes:
                raise ValueError(f"condition {self.contrast_on!r} has {part.num_classes} values, the objective "
                                 f"was built with num_classes={self.num_classes}")
        return labels

    def bias_correction(self, direction: str = "to_fm", lam: float | None = None) -> BiasCorrection:
        """The sampling-time correction matching this objective (λ defaults to its final value)."""
        return BiasCorrection(
            lam=self.lam_schedule.end if lam is None else lam,
            mean_target=self.mean_target,
            path=self.path,
            other_classes=self.negatives == "different_class",
            negative_time=self.negative_time,
            direction=direction,
            null_class=self.num_classes if self.conditioning == "class" else None,
            correct_null=self.contrast_unconditional,
            label_key=self.contrast_on,
        )

    def sampling_correction(
        self,
        map: str = "to_fm",
        images_seen: float = 0.0,
        lam: float | None = None,
        other_classes: bool | None = None,
        interval: tuple[float, float] | None = (0.0, 1.0),
    ) -> BiasCorrection | None:
        """The one rule for the affine map a model trained with this objective is sampled with.

        * ``none``: None (the raw field);
        * ``to_fm`` (the bias correction): λ = ``lam`` if given, else λ at ``images_seen`` (the λ the
          model was last trained with); None when λ = 0 (the map is the identity);
        * ``to_delta`` (an FM model mapped post hoc to the ΔFM optimum): needs ``lam`` in (0, 1).

        ``other_classes`` overrides whether ū is the mean of the *other* classes (different-class
        negatives; default: this objective's negatives). ``interval``: the t-window where the map acts
        (see :func:`deltafm.correction.correction_window`; None = nowhere, i.e. no map). Raises
        ValueError when no mean target is stored (nothing to build ū from).
        """
        if map == "none" or interval is None:
            return None
        if map not in ("to_fm", "to_delta"):
            raise ValueError(f"map must be 'none', 'to_fm' or 'to_delta', got {map!r}")
        if map == "to_fm":
            lam = self.lam_at(images_seen) if lam is None else check_lambda(lam)
            if lam <= 0:
                return None
        elif lam is None or not 0.0 < check_lambda(lam):
            raise ValueError(f"map 'to_delta' needs 0 < lam < 1, got {lam}")
        if not self.mean_target.initialized:
            raise ValueError("no mean target is stored (it is estimated during training): cannot build ū "
                             f"for map {map!r}")
        corr = self.bias_correction(direction=map, lam=lam)
        corr.interval = (float(interval[0]), float(interval[1]))
        if other_classes is not None:
            corr.other_classes = other_classes
        return corr

    def state_dict(self) -> dict[str, Tensor]:
        """The objective's learned state (the running means for the bias correction)."""
        return self.mean_target.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.mean_target.load_state_dict(state)
