"""CLIP-score of generated images against their prompts, with CLIP weights from a local folder.

For an image I and its prompt C::

    CLIPScore(I, C) = max(100 · cos(E_I, E_C), 0)

with E_I the image embedding (the vision tower's pooled output through ``visual_projection``) and E_C the
text embedding (the end-of-text token through ``text_projection``) of a transformers ``CLIPModel``. This is
Hessel et al.'s CLIPScore (2021) with the weight 100 instead of 2.5, the form torchmetrics and most
text-to-image papers report. A set of N pairs is summarised by the mean of the per-pair scores (each pair
clamped at 0), their standard deviation and the standard error sd/√N. (torchmetrics' ``clip_score`` clamps
the *mean* instead; the two agree whenever every cosine is positive, as it is for trained CLIP models.)

Images go through the folder's own image processor (``preprocessor_config.json``: shortest side resized,
centre crop, rescale to [0, 1], per-channel normalisation; ``processor_config.json`` in newer
transformers), prompts through its tokenizer, truncated at the
text tower's ``max_position_embeddings`` (77 for OpenAI CLIP). Grey images (C = 1) are repeated to RGB.
Nothing is downloaded: the folder is one written by ``CLIPModel.save_pretrained`` and
``CLIPProcessor.save_pretrained`` (for OpenAI's ViT-L/14: on a machine with internet,
``CLIPModel.from_pretrained('openai/clip-vit-large-patch14').save_pretrained(D)`` and the same for
``CLIPProcessor``), and every ``from_pretrained`` here runs with ``local_files_only``.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltafm.eval.metrics import EvalInputError

__all__ = ["ClipScorer", "load_clip_scorer", "summarise"]

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
#: where save_pretrained puts the image processor's settings (older transformers: the first; 5.x: the second)
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _read_config(folder: Path) -> dict[str, Any]:
    from deltafm.hub import read_config

    path = folder / "config.json"
    cfg = read_config(folder, EvalInputError, f"--clip {folder} is not a CLIP folder: no config.json (pass a folder "
                      "written by CLIPModel.save_pretrained and CLIPProcessor.save_pretrained)")
    if not isinstance(cfg, dict) or cfg.get("model_type") != "clip":
        mt = cfg.get("model_type") if isinstance(cfg, dict) else None
        what = ("only one tower of CLIP; CLIP-score needs the whole CLIPModel (text and vision towers with "
                "their projections)" if mt in ("clip_text_model", "clip_vision_model") else "not a CLIPModel")
        raise EvalInputError(f"{path}: model_type {mt!r} is {what}")
    return cfg


def _check_folder(spec: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    from deltafm.hub import local_folder, require_weights

    folder = local_folder(spec, "--clip", lambda t: (
        f"save it with CLIPModel.from_pretrained('{t}').save_pretrained(D) and "
        f"CLIPProcessor.from_pretrained('{t}').save_pretrained(D), then pass D"), EvalInputError)
    cfg = _read_config(folder)
    require_weights(folder, EvalInputError)
    if not any((folder / f).is_file() for f in _PROCESSOR_FILES):
        raise EvalInputError(f"{folder}: no image-processor settings ({' or '.join(_PROCESSOR_FILES)}); save them "
                             "with CLIPProcessor.save_pretrained(folder)")
    if not any((folder / t).is_file() for t in _TOKENIZER_FILES):
        raise EvalInputError(f"{folder}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}); save them with "
                             "CLIPProcessor.save_pretrained(folder)")
    return folder, cfg


def _digest(folder: Path) -> str:
    """sha256 over the folder's config, weight, tokenizer and preprocessor files (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file() and (f.suffix in (".json", ".txt", ".safetensors", ".bin", ".model")):
            h.update(f.name.encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


@dataclass
class ClipScorer:
    """A frozen ``CLIPModel`` with its processor; :meth:`score` gives per-pair CLIP-scores."""

    model: Any
    processor: Any
    max_tokens: int
    identity: str
    device: torch.device

    @torch.no_grad()
    def image_embeddings(self, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
        """Unit-norm image embeddings (N, D), float32 on the CPU, of uint8 images (N, H, W, C) or (N, C, H, W)."""
        images = _as_nhwc(images)
        out = []
        for i in range(0, len(images), batch_size):
            chunk = list(images[i:i + batch_size])
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"]
            e = self.model.get_image_features(pixel_values=pixels.to(self.device))
            out.append(_unit(_tensor(e)))
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Unit-norm text embeddings (P, D), float32 on the CPU, of the prompts (truncated at max_tokens)."""
        for k, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise EvalInputError(f"prompt {k} is empty; every image needs a non-empty prompt")
        out = []
        for i in range(0, len(prompts), batch_size):
            tok = self.processor(text=list(prompts[i:i + batch_size]), return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_tokens)
            e = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                             attention_mask=tok["attention_mask"].to(self.device))
            out.append(_unit(_tensor(e)))
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)

    def score(self, images: np.ndarray, prompts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Per-pair CLIP-scores max(100 cos(E_I, E_C), 0), float64 (N,). ``prompts`` has one entry per image;
        repeated prompts are encoded once."""
        if len(prompts) != len(images):
            raise EvalInputError(f"{len(images)} images but {len(prompts)} prompts; give one prompt per image")
        distinct = list(dict.fromkeys(prompts))
        where = {p: k for k, p in enumerate(distinct)}
        text = self.text_embeddings(distinct, batch_size)[[where[p] for p in prompts]]
        image = self.image_embeddings(images, batch_size)
        cos = (image.double() * text.double()).sum(-1)
        return (100.0 * cos).clamp_min(0.0).numpy()


def _tensor(e: Any) -> torch.Tensor:
    """The embedding tensor of get_*_features (a tensor, or an output object in newer transformers)."""
    if isinstance(e, torch.Tensor):
        return e.float().cpu()
    return e.pooler_output.float().cpu()


def _unit(e: torch.Tensor) -> torch.Tensor:
    return e / e.norm(dim=-1, keepdim=True)


def _as_nhwc(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) from (N, H, W, C) or (N, C, H, W) with C in {1, 3}; other layouts are an error."""
    a = np.asarray(images)
    if a.dtype != np.uint8 or a.ndim != 4:
        raise EvalInputError(f"images must be uint8 (N, H, W, C) or (N, C, H, W), got {a.dtype} {tuple(a.shape)}")
    if a.shape[-1] not in (1, 3) and a.shape[1] in (1, 3):
        a = a.transpose(0, 2, 3, 1)
    if a.shape[-1] not in (1, 3):
        raise EvalInputError(f"images must have 1 or 3 channels, got shape {tuple(a.shape)}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(a)


def load_clip_scorer(spec: str | os.PathLike, device: torch.device | str = "cpu") -> ClipScorer:
    """The CLIP model and processor saved in the folder ``spec`` (float32, eval mode, on ``device``)."""
    folder, cfg = _check_folder(spec)
    try:
        from transformers import CLIPModel, CLIPProcessor
    except ImportError:
        raise EvalInputError("CLIP-score needs the package transformers: pip install 'deltafm[text]'") from None
    from deltafm.hub import first_line, quiet_hf_loading

    with quiet_hf_loading():
        try:
            model = CLIPModel.from_pretrained(str(folder), local_files_only=True).float().eval()
            processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # damaged files fail in many classes
            raise EvalInputError(f"{folder}: cannot load the CLIP model or processor ({first_line(e)})") from None
    model.requires_grad_(False)
    max_tokens = int((cfg.get("text_config") or {}).get("max_position_embeddings", 77))
    device = torch.device(device)
    return ClipScorer(model.to(device), processor, max_tokens, f"CLIPModel:{_digest(folder)[:16]}", device)


def summarise(scores: np.ndarray) -> dict[str, float]:
    """``clip_score`` (mean), ``clip_score_sd`` (sample sd), ``clip_score_se`` (sd/√N) and ``n``."""
    s = np.asarray(scores, dtype=np.float64)
    sd = float(s.std(ddof=1)) if len(s) > 1 else float("nan")
    return {"clip_score": float(s.mean()) if len(s) else float("nan"), "clip_score_sd": sd,
            "clip_score_se": sd / math.sqrt(len(s)) if len(s) > 1 else float("nan"), "n": int(len(s))}
