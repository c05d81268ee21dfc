"""The ``conditioning`` section of the training config: class ids, several named conditions, or a text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from deltafm.typed_config import ConfigError

__all__ = ["ConditioningConfig", "validate_conditioning"]


@dataclass
class ConditioningConfig:
    """What the model is conditioned on (:mod:`deltafm.conditioning`).

    ``kind``: ``class`` (default: the dataset's class ids, as always), ``multi`` (several named class-id
    conditions the dataset provides per item, e.g. the shapes set's ``shape``, ``colour``, ``position``;
    ``parts`` picks them, default all) or ``text`` (the dataset's captions, encoded once by
    ``text_encoder``: a local transformers folder or ``minilm``, padded to ``max_tokens``).
    ``text_table`` (``text``): ``table`` encodes every distinct caption once at start into a float16 table,
    ``batch`` encodes each batch's captions with the frozen encoder on the training device, ``auto`` (default)
    picks ``table`` when it takes at most 2 GiB (:data:`~deltafm.train.conditions.TABLE_LIMIT`), else ``batch``.
    ``truncate`` (``text``): cut captions longer than ``max_tokens`` (as CLIP pipelines do) instead of
    refusing them.
    ``dropout``: per-part dropout rate (``multi``; parts not named use ``objective.label_dropout``, which is
    also the text's rate); ``joint_dropout``: probability of nulling every part of a sample at once.
    ``contrast_on`` (``multi``): the part whose ids different-class negatives must differ in and the
    class-wise ū (bias correction) is over. ``guidance`` (``multi``): default per-part CFG weights for
    sampling (compositional CFG; parts not named use ``sample.cfg``).
    """

    kind: Literal["class", "multi", "text"] = "class"
    parts: list[str] = field(default_factory=list)
    dropout: dict[str, float] = field(default_factory=dict)
    joint_dropout: float = 0.0
    contrast_on: str | None = None
    guidance: dict[str, float] = field(default_factory=dict)
    text_encoder: str | None = None
    max_tokens: int = 32
    text_table: Literal["auto", "table", "batch"] = "auto"
    truncate: bool = False


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {msg}")


def validate_conditioning(c: ConditioningConfig, negatives: str) -> None:
    """Check the section; raise :class:`ConfigError` naming the key."""
    if c.kind != "multi":
        for key, value in (("parts", c.parts), ("dropout", c.dropout), ("contrast_on", c.contrast_on),
                           ("guidance", c.guidance)):
            _require(not value, f"conditioning.{key}", f"applies to conditioning.kind=multi only (kind is {c.kind!r})")
    if c.kind != "text":
        for key, unset in (("text_encoder", c.text_encoder is None), ("text_table", c.text_table == "auto"),
                           ("truncate", not c.truncate)):
            _require(unset, f"conditioning.{key}", f"applies to conditioning.kind=text only (kind is {c.kind!r})")
    else:
        _require(bool(c.text_encoder), "conditioning.text_encoder",
                 "must name a text encoder (a local transformers folder, or 'minilm') for kind=text")
        _require(c.max_tokens >= 1, "conditioning.max_tokens", f"must be >= 1, got {c.max_tokens}")
    _require(c.kind == "class" or negatives != "different_class" or c.contrast_on is not None,
             "conditioning.contrast_on", "must name the part different-class negatives differ in (kind=multi; "
             "a text has no classes: use objective.negatives=uniform)")
    for name, p in c.dropout.items():
        _require(0.0 <= p < 1.0, f"conditioning.dropout.{name}", f"must be in [0, 1), got {p}")
    _require(0.0 <= c.joint_dropout < 1.0, "conditioning.joint_dropout", f"must be in [0, 1), got {c.joint_dropout}")
    _require(c.kind != "class" or c.joint_dropout == 0, "conditioning.joint_dropout",
             "applies to kind=multi or text (class ids use objective.label_dropout)")
    if c.parts:
        _require(len(set(c.parts)) == len(c.parts), "conditioning.parts", f"names each part once, got {c.parts}")
        for key, names in (("dropout", c.dropout), ("guidance", c.guidance)):
            extra = sorted(set(names) - set(c.parts))
            _require(not extra, f"conditioning.{key}", f"names part(s) {extra} not in conditioning.parts {c.parts}")
        _require(c.contrast_on is None or c.contrast_on in c.parts, "conditioning.contrast_on",
                 f"must be one of conditioning.parts {c.parts}, got {c.contrast_on!r}")
