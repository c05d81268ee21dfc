"""What a run conditions its model on, and how a batch's labels become that condition.

``conditioning.kind`` (:class:`~deltafm.train.conditioning_config.ConditioningConfig`):

* ``class``: the batch's class ids, unchanged (no :class:`Conditions` object; the run is what it always was).
* ``multi``: named class-id conditions the dataset holds per item (``cond.<name>``, e.g. the shapes set's
  shape, colour, size and cell), read with each batch and packed into a
  :class:`~deltafm.conditioning.MultiCond` of :class:`~deltafm.conditioning.Labels`.
* ``text``: the dataset's captions (``captions``, ``caption_ids``; a dataset with ``require_captions()``
  names an item without one first) through the frozen text encoder
  (:func:`deltafm.encoders.load_text_encoder`), padded to ``max_tokens`` (longer captions refused, or cut
  with ``conditioning.truncate``). A batch reads its caption ids (``caption``) and gets a
  :class:`~deltafm.conditioning.TextCond` in one of two modes (``conditioning.text_table``):

  - ``table``: each distinct caption encoded once at start into a table on the training device (tokens kept
    in float16, cast to float32 per batch; mask and pooled as encoded); the batch gathers its rows. A caption
    the encoder refuses stops the start with its index and text.
  - ``batch``: the encoder moves to the training device and encodes the batch's captions each step (under
    no_grad, float32): the same features as the table's before its float16 rounding. Without ``truncate``
    every caption is tokenized once at start, so an over-long one stops the start, not a later step.

  ``auto`` takes ``table`` when :func:`table_bytes` ≤ :data:`TABLE_LIMIT` (2 GiB), else ``batch``: CC3M's
  3.3 M captions at 77 tokens of CLIP-L's 768 would need ~390 GB.

:meth:`Conditions.describe` is what a checkpoint stores (``DataInfo.conditioning``), so ``deltafm sample``
rebuilds the same conditioning without the dataset (:meth:`Conditions.from_description`); for text it
reloads the encoder and checks its identity.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from deltafm.conditioning import Cond, Labels, MultiCond, TextCond, cat_conds, cond_to, select

from .conditioning_config import ConditioningConfig
from .errors import SetupError

__all__ = ["TABLE_LIMIT", "Conditions", "part_weights", "table_bytes"]

#: the most bytes ``conditioning.text_table=auto`` spends on a table of encoded captions
TABLE_LIMIT = 2 * 1024**3


def part_weights(parts: Iterable[str], weights: Mapping[str, float], scale: float) -> float | dict[str, float]:
    """The CFG argument for a model conditioned on ``parts``: one weight per part (compositional CFG; a part
    without a weight of its own gets ``scale``) when any weight is given, else the one joint ``scale``."""
    if not weights:
        return scale
    return {p: float(weights.get(p, scale)) for p in parts}


def table_bytes(captions: int, max_tokens: int, token_dim: int, pooled_dim: int) -> int:
    """Bytes of the table of ``captions`` encoded captions: float16 tokens, bool mask, float32 pooled vector."""
    return captions * (max_tokens * token_dim * 2 + max_tokens + pooled_dim * 4)


class Conditions:
    """A run's ``multi`` or ``text`` conditioning; ``conditions(y, extras)`` gives the batch's condition."""

    def __init__(self, kind: str, values: Mapping[str, Sequence[str]] | None = None,
                 text: dict[str, Any] | None = None, encoder: Any = None) -> None:
        self.kind = kind
        self.values = {k: tuple(v) for k, v in (values or {}).items()}
        self.text = dict(text or {})
        self.encoder = encoder
        self.table: TextCond | None = None  # text, table mode: every caption's features
        self.captions: Sequence[str] | None = None  # text, batch mode: the captions the ids index
        self.mode = "table"  # text: "table" or "batch" (conditioning.text_table)

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
        return cls._text_from_config(cfg, dataset, device, progress)

    @classmethod
    def _text_from_config(cls, cfg: ConditioningConfig, dataset: Any, device: torch.device,
                          progress: bool) -> Conditions:
        """``kind=text``: the dataset's captions (every item must have one), the encoder, the table or batch mode."""
        if hasattr(dataset, "require_captions"):
            dataset.require_captions()  # a DataError naming the first item without a caption
        captions = getattr(dataset, "captions", None)
        if not captions:
            raise SetupError(f"conditioning.kind=text needs captions; dataset {dataset.name!r} has none "
                             "(shapes, shapes-scenes, and folders, webdataset tars or latents with captions: "
                             "docs/DATA.md)")
        encoder = _load_encoder(cfg.text_encoder)
        out = cls("text", text={"encoder": cfg.text_encoder, "identity": encoder.identity,
                                "token_dim": encoder.token_dim, "pooled_dim": encoder.pooled_dim,
                                "max_tokens": cfg.max_tokens, "truncate": bool(cfg.truncate)}, encoder=encoder)
        out.mode = cfg.text_table
        if out.mode == "auto":
            size = table_bytes(len(captions), cfg.max_tokens, encoder.token_dim, encoder.pooled_dim)
            out.mode = "table" if size <= TABLE_LIMIT else "batch"
        if out.mode == "batch":
            out.encoder = encoder.to(device)
            out.captions = captions
            if not cfg.truncate:
                out.check_lengths(captions, progress)
            out.encode(captions[:1])  # max_tokens within the encoder's limit, the encoder on the device: now
            return out
        from .text_cache import load_table, save_table, table_key

        key = table_key(encoder.identity, cfg.max_tokens, bool(cfg.truncate), captions)
        table = load_table(key)  # the same encoder on the same captions: encoded before (train/text_cache.py)
        if table is None:
            table = out.encode(captions, progress=progress, token_dtype=torch.float16)
            save_table(key, table)
        out.table = TextCond(table.tokens.half().to(device), table.mask.to(device), table.pooled.to(device),
                             table.null.to(device))
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
        if self.mode == "batch":
            assert self.captions is not None
            texts = [self.captions[i] for i in extras["caption"].tolist()]
            return cond_to(self.encode(texts), y.device)
        assert self.table is not None
        rows = select(self.table, extras["caption"])
        assert isinstance(rows, TextCond)
        return TextCond(rows.tokens.float(), rows.mask, rows.pooled, rows.null)  # the table keeps float16 tokens

    def for_grid(self, dataset: Any, n: int) -> tuple[Cond, list[str]]:
        """Conditions and titles of sample grids: those of the dataset's first ``n`` items (its values or
        captions), so a grid can be checked against what it was asked for."""
        n = min(n, len(dataset))
        if self.kind == "multi":
            ids = {k: dataset.conditions[k][:n].cpu() for k in self.values}
            rows = [{k: self.values[k][int(ids[k][i])] for k in self.values} for i in range(n)]
            return self.from_values(rows), [" ".join(r.values()) for r in rows]
        cap = dataset.caption_ids[:n].cpu()
        titles = [dataset.captions[int(c)] for c in cap]
        return self(cap, {"caption": cap}), titles

    def encode(self, captions: Sequence[str], progress: bool = False, batch_size: int = 256,
               token_dtype: torch.dtype = torch.float32) -> TextCond:
        """Text features of ``captions`` padded to ``max_tokens``, cut to it when the run truncates (tokens in
        ``token_dtype``, each chunk cast as it is made, so a float16 table never exists in float32 whole;
        on the encoder's device); a caption the encoder refuses is a :class:`SetupError` giving its index in
        ``captions`` and its text."""
        max_tokens, truncate = int(self.text["max_tokens"]), bool(self.text.get("truncate", False))
        # chunks of similar length (each chunk runs at its longest caption): about 2x faster on varied captions
        order = sorted(range(len(captions)), key=lambda i: len(captions[i]))
        chunks = self._chunked([captions[i] for i in order], batch_size, "encoding captions", progress,
                               lambda part: _cast(self.encoder.encode(part, max_tokens, truncate=truncate),
                                                  token_dtype), positions=order)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        table = cat_conds(chunks)
        return select(table, inverse)  # type: ignore[return-value]

    def check_lengths(self, captions: Sequence[str], progress: bool = False, batch_size: int = 4096) -> None:
        """Tokenize every caption once (no model run): one over ``max_tokens`` is a :class:`SetupError` giving
        its index and text (batch mode without truncation checks them all at start)."""
        max_tokens = int(self.text["max_tokens"])

        def check(part: list[str]) -> None:
            self.encoder.tokenize(part, max_tokens)

        self._chunked(captions, batch_size, "checking caption lengths", progress, check)

    def _chunked(self, captions: Sequence[str], batch_size: int, desc: str, progress: bool,
                 fn: Callable[[list[str]], Any], positions: Sequence[int] | None = None) -> list[Any]:
        """``fn`` of each run of ``batch_size`` captions (a progress bar when asked and worth it); a chunk the
        encoder refuses is :meth:`_refused`'s error."""
        if self.encoder is None:
            raise SetupError("no text encoder loaded: cannot encode prompts")
        bar = None
        if progress and len(captions) > batch_size:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(captions), unit="caption", desc=desc, dynamic_ncols=True)
        out = []
        try:
            for i in range(0, len(captions), batch_size):
                part = list(captions[i:i + batch_size])
                try:
                    out.append(fn(part))
                except ValueError as e:
                    raise self._refused(part, i, e, positions) from None
                if bar is not None:
                    bar.update(len(part))
        finally:
            if bar is not None:
                bar.close()
        return out

    def _refused(self, part: list[str], start: int, error: ValueError,
                 positions: Sequence[int] | None = None) -> SetupError:
        """The error for a chunk the encoder refused: the first caption of ``part`` it refuses alone, with its
        index (``start`` + position, mapped through ``positions`` when the captions were reordered) and first
        80 characters."""
        max_tokens, truncate = int(self.text["max_tokens"]), bool(self.text.get("truncate", False))
        for j, caption in enumerate(part):
            try:
                self.encoder.tokenize([caption], max_tokens, truncate=truncate)
            except ValueError as e:
                why = re.sub(r"^caption 0 \(.*\) is ", "it is ", str(e), flags=re.S)
                hint = "" if truncate else "; or set conditioning.truncate=true (cut to max_tokens, as CLIP does)"
                shown = caption[:80] + ("..." if len(caption) > 80 else "")
                index = start + j if positions is None else positions[start + j]
                return SetupError(f"text conditioning: caption {index} ({shown!r}): "
                                  f"{why.replace(' or pass truncate=True', '')}{hint}")
        return SetupError(f"text conditioning: {error}")

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


def _cast(cond: TextCond, dtype: torch.dtype) -> TextCond:
    return cond if cond.tokens.dtype == dtype else TextCond(cond.tokens.to(dtype), cond.mask, cond.pooled, cond.null)


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
