"""What a model is conditioned on: class ids, a text, or several named conditions, and their null.

The model call is ``model(x, t, cond)`` with one conditioning argument of one of three kinds:

* **class ids**: a LongTensor (B,) with ids in ``[0, K]``; the id ``K`` (= ``num_classes``) is the learned
  null class used for classifier-free guidance. This is the original interface and stays bit-identical.
* :class:`TextCond`: token features ``tokens`` (B, L, D), a token ``mask`` (B, L) (True = a real token,
  False = padding), a ``pooled`` vector (B, P) and a ``null`` flag (B,). A row with ``null`` set is the
  unconditional text: the model replaces its tokens and pooled vector by a learned null (its token and
  pooled features are then ignored), so "dropping" a text never depends on what an empty caption encodes to.
* :class:`MultiCond`: an ordered mapping ``name -> Labels | TextCond`` (e.g. shape, colour, position), each
  part with its own null, so every part can be dropped on its own and guided with its own weight.

:class:`Labels` are class ids that carry their own count (null id = ``num_classes``), so a multi-condition
is self-describing: dropping, nulling and slicing need no side table.

Dropout (done by the objective, per sample, before the forward pass; :func:`drop_condition`): each part
``k`` is replaced by its null with probability p_k, independently, then with probability ``joint`` every
part is nulled together (the unconditional branch of joint CFG). For ``K`` parts the random draws are
``K`` uniform vectors in part order, then one for ``joint`` (only when ``joint > 0``). A sample is
*unconditional* when every part is null (:func:`null_mask`).

:class:`Indexed` describes N conditions as rows of a table of P (P prompts cycled over N samples):
:func:`batch_size` and :func:`select` accept it, so a sampler gathers each batch's rows from the table and
the N-row condition is never built.

Guidance over several conditions (:func:`deltafm.guidance.GuidedVelocity` with a weight per part) uses the
leave-one-out form

    v = v(c) + Σ_k (w_k − 1) · (v(c) − v(c without k)),

which for one condition is ordinary CFG, v_∅ + w (v_c − v_∅), and needs only the branches with one part
dropped, the ones per-part dropout trains.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = [
    "Cond",
    "Indexed",
    "Labels",
    "MultiCond",
    "TextCond",
    "batch_size",
    "cat_conds",
    "class_ids",
    "cond_to",
    "drop_condition",
    "null_condition",
    "null_mask",
    "select",
    "without",
]


def _check_ids(ids: Tensor, what: str) -> None:
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.ndim != 1:
        raise ValueError(f"{what} must be integer ids of shape (B,), got dtype {ids.dtype} shape {tuple(ids.shape)}")


@dataclass(frozen=True)
class Labels:
    """Class ids (B,) of one named condition with ``num_classes`` values; id ``num_classes`` is its null."""

    ids: Tensor
    num_classes: int

    def __post_init__(self) -> None:
        _check_ids(self.ids, "Labels.ids")
        if self.num_classes < 1:
            raise ValueError(f"Labels.num_classes must be >= 1, got {self.num_classes}")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def null(self) -> Tensor:
        """(B,) bool: which rows hold the null id."""
        return self.ids == self.num_classes

    def nulled(self, mask: Tensor) -> Labels:
        """Rows where ``mask`` is True replaced by the null id."""
        return Labels(torch.where(mask, torch.full_like(self.ids, self.num_classes), self.ids), self.num_classes)


@dataclass(frozen=True)
class TextCond:
    """Token features of a text per sample, with its padding mask, pooled vector and null flag.

    ``tokens`` (B, L, D) float, ``mask`` (B, L) bool (True = a real token; each row has at least one unless
    it is null), ``pooled`` (B, P) float, ``null`` (B,) bool. A null row is the unconditional text; models
    substitute a learned null for it.
    """

    tokens: Tensor
    mask: Tensor
    pooled: Tensor
    null: Tensor

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3:
            raise ValueError(f"TextCond.tokens must be (B, L, D), got shape {tuple(self.tokens.shape)}")
        b, n = self.tokens.shape[:2]
        if self.mask.shape != (b, n) or self.mask.dtype != torch.bool:
            raise ValueError(f"TextCond.mask must be bool of shape ({b}, {n}), got {self.mask.dtype} "
                             f"{tuple(self.mask.shape)}")
        if self.pooled.ndim != 2 or self.pooled.shape[0] != b:
            raise ValueError(f"TextCond.pooled must be ({b}, P), got shape {tuple(self.pooled.shape)}")
        if self.null.shape != (b,) or self.null.dtype != torch.bool:
            raise ValueError(f"TextCond.null must be bool of shape ({b},), got {self.null.dtype} "
                             f"{tuple(self.null.shape)}")

    @classmethod
    def from_features(cls, tokens: Tensor, mask: Tensor, pooled: Tensor) -> TextCond:
        """A text condition with no null rows."""
        return cls(tokens, mask.bool(), pooled, torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device))

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def token_dim(self) -> int:
        return int(self.tokens.shape[2])

    @property
    def pooled_dim(self) -> int:
        return int(self.pooled.shape[1])

    def nulled(self, mask: Tensor) -> TextCond:
        """Rows where ``mask`` is True marked null (their features are kept but ignored by models)."""
        return replace(self, null=self.null | mask)


@dataclass(frozen=True)
class MultiCond:
    """Several named conditions of one batch, in a fixed order: ``parts[name]`` is Labels or TextCond."""

    parts: Mapping[str, Labels | TextCond]

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("MultiCond needs at least one part")
        sizes = {name: len(p) for name, p in self.parts.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"MultiCond parts must have the same batch size, got {sizes}")
        for name, p in self.parts.items():
            if not isinstance(p, Labels | TextCond):
                raise ValueError(f"MultiCond part {name!r} must be Labels or TextCond, got {type(p).__name__}")

    def __len__(self) -> int:
        return len(next(iter(self.parts.values())))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.parts)

    def __getitem__(self, name: str) -> Labels | TextCond:
        if name not in self.parts:
            raise KeyError(f"no condition {name!r}; this batch has {', '.join(self.parts)}")
        return self.parts[name]


#: The conditioning argument of a model call: class ids, one text, or several named conditions.
Cond = Tensor | TextCond | MultiCond


@dataclass(frozen=True)
class Indexed:
    """N conditions as rows of a table: row i is row ``ids[i]`` of ``table`` (a Cond of P rows).

    Not a model argument: :func:`select` gathers a batch's rows into a plain condition, so N samples of P
    prompts hold P encoded texts and N ids, never N texts. ``ids`` (N,) are integers in [0, P).
    """

    table: Cond
    ids: Tensor

    def __post_init__(self) -> None:
        _check_ids(self.ids, "Indexed.ids")
        p = batch_size(self.table)
        if len(self.ids) and not (0 <= int(self.ids.min()) and int(self.ids.max()) < p):
            raise ValueError(f"Indexed.ids must be rows of the table, in [0, {p}), got "
                             f"{int(self.ids.min())} .. {int(self.ids.max())}")

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def batch_size(cond: Cond | Indexed) -> int:
    """Number of samples a condition describes."""
    return int(cond.shape[0]) if isinstance(cond, Tensor) else len(cond)


def _map(cond: Cond, tensor_fn) -> Cond:
    """Apply ``tensor_fn`` to every tensor field."""
    if isinstance(cond, Tensor):
        return tensor_fn(cond)
    if isinstance(cond, Labels):
        return Labels(tensor_fn(cond.ids), cond.num_classes)
    if isinstance(cond, TextCond):
        return TextCond(tensor_fn(cond.tokens), tensor_fn(cond.mask), tensor_fn(cond.pooled), tensor_fn(cond.null))
    if isinstance(cond, MultiCond):
        return MultiCond({k: _map(p, tensor_fn) for k, p in cond.parts.items()})
    raise TypeError(f"not a condition: {type(cond).__name__}")


def select(cond: Cond | Indexed, index: Tensor | slice) -> Cond:
    """Rows ``index`` (a slice or a LongTensor of indices) of every field (of an :class:`Indexed`: the table's
    rows its ids at ``index`` name, as a plain condition)."""
    if isinstance(cond, Indexed):
        ids = cond.ids[index] if isinstance(index, slice) else cond.ids.index_select(0, index.to(cond.ids.device))
        return select(cond.table, ids)
    if isinstance(index, slice):
        return _map(cond, lambda x: x[index])
    return _map(cond, lambda x: x.index_select(0, index.to(x.device)))


def cond_to(cond: Cond, device: torch.device | str) -> Cond:
    """The condition with every tensor on ``device``."""
    return _map(cond, lambda x: x.to(device))


def cat_conds(conds: Sequence[Cond]) -> Cond:
    """Concatenate conditions of the same kind and layout along the batch."""
    first = conds[0]
    if isinstance(first, Tensor):
        return torch.cat(list(conds))
    if isinstance(first, Labels):
        return Labels(torch.cat([c.ids for c in conds]), first.num_classes)
    if isinstance(first, TextCond):
        lengths = {c.tokens.shape[1] for c in conds}
        if len(lengths) != 1:
            raise ValueError(f"cannot concatenate texts padded to different lengths {sorted(lengths)}")
        return TextCond(*(torch.cat([getattr(c, f) for c in conds]) for f in ("tokens", "mask", "pooled", "null")))
    if isinstance(first, MultiCond):
        return MultiCond({k: cat_conds([c.parts[k] for c in conds]) for k in first.parts})
    raise TypeError(f"not a condition: {type(first).__name__}")


def null_condition(cond: Cond, null_class: int | None = None) -> Cond:
    """Every row unconditional: class ids -> ``null_class``; every text / part -> its null."""
    if isinstance(cond, Tensor):
        if null_class is None:
            raise ValueError("nulling class ids needs the null_class id")
        return torch.full_like(cond, null_class)
    return without(cond, None)


def without(cond: TextCond | MultiCond, name: str | None, mask: Tensor | None = None) -> TextCond | MultiCond:
    """The condition with part ``name`` nulled (all parts when ``name`` is None) on the rows of ``mask``
    (every row when None)."""
    if mask is None:
        mask = torch.ones(batch_size(cond), dtype=torch.bool)
    if isinstance(cond, TextCond):
        return cond.nulled(mask.to(cond.null.device))
    if isinstance(cond, MultiCond):
        if name is not None and name not in cond.parts:
            raise KeyError(f"no condition {name!r}; this batch has {', '.join(cond.parts)}")
        return MultiCond({
            k: (p.nulled(mask.to(p.null.device)) if name is None or k == name else p)
            for k, p in cond.parts.items()
        })
    raise TypeError(f"cannot null part {name!r} of {type(cond).__name__}")


def null_mask(cond: Cond, null_class: int | None = None) -> Tensor:
    """(B,) bool: rows that are unconditional (class id == ``null_class``; a null text; every part null)."""
    if isinstance(cond, Tensor):
        if null_class is None:
            return torch.zeros(cond.shape[0], dtype=torch.bool, device=cond.device)
        return cond == null_class
    if isinstance(cond, Labels | TextCond):
        return cond.null
    out = None
    for p in cond.parts.values():
        out = p.null if out is None else out & p.null.to(out.device)
    assert out is not None
    return out


def class_ids(cond: Cond | None, key: str | None = None) -> Tensor | None:
    """The class ids that class-wise quantities (different-class negatives, per-class means ū) refer to:
    the ids themselves for class conditioning, part ``key``'s ids for a multi-condition, else None."""
    if cond is None or isinstance(cond, Tensor):
        return cond
    if isinstance(cond, MultiCond) and key is not None:
        part = cond[key]
        if not isinstance(part, Labels):
            raise ValueError(f"condition {key!r} is a text, not class ids")
        return part.ids
    if isinstance(cond, Labels):
        return cond.ids
    return None


def drop_condition(
    cond: TextCond | MultiCond,
    rate: float | Mapping[str, float],
    joint: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[TextCond | MultiCond, Tensor]:
    """Per-sample dropout to the null: returns (dropped condition, (B,) mask of fully unconditional rows).

    ``rate``: one probability for every part, or one per part name (missing names: 0). ``joint``: the
    probability of nulling every part of a row at once, drawn after the per-part draws. Draws come from
    ``generator`` (on its device) in part order: one uniform (B,) vector per part with a rate > 0, then one
    for ``joint`` when it is > 0.
    """
    b = batch_size(cond)
    names = cond.names if isinstance(cond, MultiCond) else ("text",)
    rates = {n: float(rate) for n in names} if not isinstance(rate, Mapping) else {n: float(rate.get(n, 0.0))
                                                                                  for n in names}
    if isinstance(rate, Mapping):
        unknown = sorted(set(rate) - set(names))
        if unknown:
            raise ValueError(f"dropout given for unknown condition(s) {unknown}; this batch has {list(names)}")
    for n, p in [*rates.items(), ("joint", float(joint))]:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout rate of {n!r} must be in [0, 1), got {p}")
    gen_dev = generator.device if generator is not None else torch.device("cpu")

    def draw(p: float) -> Tensor:
        return torch.rand(b, generator=generator, device=gen_dev) < p

    out = cond
    for n in names:
        if rates[n] > 0:
            out = without(out, n if isinstance(cond, MultiCond) else None, draw(rates[n]))
    if joint > 0:
        out = without(out, None, draw(joint))
    return out, null_mask(out)
