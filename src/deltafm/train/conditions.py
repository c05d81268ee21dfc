"""What a run conditions its model on, and how a batch's labels become that condition.

``conditioning.kind`` (:class:`~deltafm.train.conditioning_config.ConditioningConfig`):

* ``class``: the batch's class ids, unchanged (no :class:`Conditions` object; the run is what it always was).
* ``multi``: named class-id conditions the dataset holds per item (``cond.<name>``, e.g. the shapes set's
  shape, colour, size and cell), read with each batch and packed into a
  :class:`~deltafm.conditioning.MultiCond` of :class:`~deltafm.conditioning.Labels`.
* ``text``: the dataset's captions, each distinct caption encoded once at start by the text encoder
  (:func:`deltafm.encoders.load_text_encoder`), padded to ``max_tokens``; a batch reads its caption ids
  (``caption``) and gathers a :class:`~deltafm.conditioning.TextCond` from that table (tokens kept in
  float16, cast to float32 per batch).

:meth:`Conditions.describe` is what a checkpoint stores (``DataInfo.conditioning``), so ``deltafm sample``
rebuilds the same conditioning without the dataset (:meth:`Conditions.from_description`); for text it
reloads the encoder and checks its identity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from deltafm.conditioning import Cond, Labels, MultiCond, TextCond

from .conditioning_config import ConditioningConfig
from .errors import SetupError

__all__ = ["Conditions"]


class Conditions:
    """A run's ``multi`` or ``text`` conditioning; ``conditions(y, extras)`` gives the batch's condition."""

    def __init__(self, kind: str, values: Mapping[str, Sequence[str]] | None = None,
                 text: dict[str, Any] | None = None, encoder: Any = None) -> None:
        self.kind = kind
        self.values = {k: tuple(v) for k, v in (values or {}).items()}
        self.text = dict(text or {})
        self.encoder = encoder
        self.table: TextCond | None = None

    # -- building ------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: ConditioningConfig, dataset: Any, device: torch.device,
                    progress: bool = True) -> Conditions | None:
        """Check ``cfg`` against the dataset; for text, load the encoder and encode the captions. None for
        class ids. Bad input: a :class:`SetupError` saying what the data has."""
        if cfg.kind == "class":
            return None
        if cfg.kind == "multi":
            have = dict(getattr(dataset, "condition_values", {}) or {})
            if not have:
                raise SetupError(f"conditioning.kind=multi needs named conditions per item; dataset "
                                 f"{dataset.name!r} has none (the shapes set has shape, colour, size, cell)")
            parts = list(cfg.parts) or list(have)
            missing = [p for p in parts if p not in have]
            if missing:
                raise SetupError(f"conditioning.parts names {missing}, not in dataset {dataset.name!r} "
                                 f"(it has {', '.join(have)})")
            return cls("multi", {p: have[p] for p in parts})
        captions = getattr(dataset, "captions", None)
        if not captions:
            raise SetupError(f"conditioning.kind=text needs captions; dataset {dataset.name!r} has none "
                             "(the shapes-scenes and shapes sets have them)")
        encoder = _load_encoder(cfg.text_encoder)
        out = cls("text", text={"encoder": cfg.text_encoder, "identity": encoder.identity,
                                "token_dim": encoder.token_dim, "pooled_dim": encoder.pooled_dim,
                                "max_tokens": cfg.max_tokens}, encoder=encoder)
        out.table = out.encode(list(captions), progress=progress)
        out.table = TextCond(out.table.tokens.half().to(device), out.table.mask.to(device),
                             out.table.pooled.to(device), out.table.null.to(device))
        return out

    @classmethod
    def from_description(cls, desc: Mapping[str, Any] | None, load_encoder: bool = True,
                         encoder_spec: str | None = None) -> Conditions | None:
        """The conditioning a checkpoint recorded (:meth:`describe`); for text the encoder is reloaded from
        the recorded spec, or from ``encoder_spec`` when given (or ``load_encoder=False`` to skip it), and must
        have the recorded identity."""
        if not desc or desc.get("kind", "class") == "class":
            return None
        if desc["kind"] == "multi":
            return cls("multi", desc["values"])
        text = dict(desc["text"])
        encoder = None
        if load_encoder:
            spec = text["encoder"] if encoder_spec is None else encoder_spec
            encoder = _load_encoder(spec)
            if encoder.identity != text["identity"]:
                raise SetupError(f"the text encoder at {spec!r} is {encoder.identity}, but the model was "
                                 f"trained with {text['identity']}: pass the same encoder")
        return cls("text", text=text, encoder=encoder)

    def describe(self) -> dict[str, Any]:
        """What a checkpoint stores to rebuild this conditioning."""
        if self.kind == "multi":
            return {"kind": "multi", "values": {k: list(v) for k, v in self.values.items()}}
        return {"kind": "text", "text": dict(self.text)}

    # -- what other parts need -----------------------------------------------------------------------
    @property
    def counts(self) -> dict[str, int]:
        """``multi``: number of values per part."""
        return {k: len(v) for k, v in self.values.items()}

    @property
    def extra_names(self) -> tuple[str, ...]:
        """Per-item tensors the loader reads with each batch."""
        return tuple(f"cond.{k}" for k in self.values) if self.kind == "multi" else ("caption",)

    def model_kwargs(self) -> dict[str, Any]:
        """Arguments the model needs for this conditioning (SiT/MMDiT ``conditions``; MMDiT's text widths)."""
        if self.kind == "multi":
            return {"conditions": self.counts}
        t = self.text
        return {"text_dim": int(t["token_dim"]), "pooled_dim": int(t["pooled_dim"]),
                "max_text_tokens": int(t["max_tokens"])}

    def dummy(self, batch: int = 1) -> Cond:
        """A condition of ``batch`` null rows (to check that a model takes this conditioning)."""
        if self.kind == "multi":
            return MultiCond({k: Labels(torch.full((batch,), n, dtype=torch.long), n) for k, n in self.counts.items()})
        t = self.text
        return TextCond(torch.zeros(batch, 1, int(t["token_dim"])), torch.ones(batch, 1, dtype=torch.bool),
                        torch.zeros(batch, int(t["pooled_dim"])), torch.ones(batch, dtype=torch.bool))

    # -- per batch -----------------------------------------------------------------------------------
    def __call__(self, y: Tensor, extras: Mapping[str, Tensor]) -> Cond:
        """The condition of a (micro-)batch from its labels and extras."""
        if self.kind == "multi":
            return MultiCond({k: Labels(extras[f"cond.{k}"].to(y.device), n) for k, n in self.counts.items()})
        assert self.table is not None
        idx = extras["caption"].to(self.table.tokens.device)
        return TextCond(self.table.tokens.index_select(0, idx).float(), self.table.mask.index_select(0, idx),
                        self.table.pooled.index_select(0, idx), self.table.null.index_select(0, idx))

    def for_grid(self, dataset: Any, n: int) -> tuple[Cond, list[str]]:
        """Conditions and titles of sample grids: those of the dataset's first ``n`` items (its values or
        captions), so a grid can be checked against what it was asked for."""
        n = min(n, len(dataset))
        if self.kind == "multi":
            ids = {k: dataset.conditions[k][:n].cpu() for k in self.values}
            rows = [{k: self.values[k][int(ids[k][i])] for k in self.values} for i in range(n)]
            return self.from_values(rows), [" ".join(r.values()) for r in rows]
        assert self.table is not None
        cap = dataset.caption_ids[:n].cpu()
        titles = [dataset.captions[int(c)] for c in cap]
        return self(cap, {"caption": cap}), titles

    def encode(self, captions: Sequence[str], progress: bool = False, batch_size: int = 256) -> TextCond:
        """Text features of ``captions`` padded to ``max_tokens`` (bad captions: a :class:`SetupError`)."""
        if self.encoder is None:
            raise SetupError("no text encoder loaded: cannot encode prompts")
        from deltafm.conditioning import cat_conds

        bar = None
        if progress and len(captions) > batch_size:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(captions), unit="caption", desc="encoding captions", dynamic_ncols=True)
        chunks = []
        try:
            for i in range(0, len(captions), batch_size):
                chunks.append(self.encoder.encode(list(captions[i:i + batch_size]), int(self.text["max_tokens"])))
                if bar is not None:
                    bar.update(min(batch_size, len(captions) - i))
        except ValueError as e:
            raise SetupError(f"text conditioning: {e}") from None
        finally:
            if bar is not None:
                bar.close()
        return cat_conds(chunks)  # type: ignore[return-value]

    def from_values(self, rows: Sequence[Mapping[str, str]]) -> MultiCond:
        """``multi``: a MultiCond from value names per row (a missing part is that part's null)."""
        parts = {}
        for k, vocab in self.values.items():
            ids = []
            for r in rows:
                v = r.get(k)
                if v is not None and v not in vocab:
                    raise SetupError(f"condition {k}={v!r} is not one of {', '.join(vocab)}")
                ids.append(len(vocab) if v is None else vocab.index(v))
            parts[k] = Labels(torch.tensor(ids, dtype=torch.long), len(vocab))
        unknown = sorted({k for r in rows for k in r} - set(self.values))
        if unknown:
            raise SetupError(f"unknown condition(s) {unknown}; the model is conditioned on {', '.join(self.values)}")
        return MultiCond(parts)


def _load_encoder(spec: str | None) -> Any:
    try:
        from deltafm.encoders import EncoderError, load_text_encoder
    except ImportError as e:
        raise SetupError(f"conditioning.text_encoder needs transformers (pip install 'deltafm[text]'): {e}") from None
    try:
        return load_text_encoder(str(spec))
    except EncoderError as e:
        raise SetupError(f"conditioning.text_encoder: {e}") from None
    except ImportError as e:
        raise SetupError(f"conditioning.text_encoder needs transformers (pip install 'deltafm[text]'): {e}") from None
