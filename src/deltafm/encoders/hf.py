"""DINOv2 through transformers, loaded from a local ``save_pretrained`` folder: :class:`Dinov2Encoder`.

A folder holds ``config.json`` (``model_type`` ``dinov2`` or ``dinov2_with_registers``), the weights
(``model.safetensors``, ``pytorch_model.bin`` or a sharded index) and, for hub copies, a
``preprocessor_config.json`` whose ``image_mean`` / ``image_std`` give the normalisation (ImageNet's when
absent). The folders ``deltafm train-encoder`` writes are of the same kind.

The patch tokens are ``last_hidden_state[:, 1 + r:]`` with r = ``config.num_register_tokens`` (0 for
plain DINOv2): the sequence is [CLS, r registers, gh·gw patches] after the final LayerNorm, which is
REPA's ``x_norm_patchtokens``. transformers interpolates the position embeddings (bicubic) to any input
size, so the encoder runs at (gh·p, gw·p) for any grid. Nothing is downloaded: transformers is imported
only when a folder is loaded, with ``local_files_only``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deltafm.hub import read_config, read_json, require_weights

from .base import IMAGENET_MEAN, IMAGENET_STD, EncoderError, ImageEncoder, check_mean_std, encoder_name, state_digest

__all__ = ["DINOV2_TYPES", "Dinov2Encoder", "check_dinov2_folder", "hf_identity", "load_dinov2", "read_mean_std"]

#: model_type → transformers class name of the models this module loads
DINOV2_TYPES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}
#: config keys that record how a model was saved or run, not what it computes (left out of the identity)
_BOOKKEEPING = {"transformers_version", "architectures", "dtype", "torch_dtype", "id2label", "label2id",
                "problem_type", "output_attentions", "output_hidden_states", "return_dict", "out_features",
                "out_indices", "stage_names", "chunk_size_feed_forward", "is_encoder_decoder"}


def check_dinov2_folder(folder: Path) -> dict[str, Any]:
    """The ``config.json`` of a transformers DINOv2 folder, or an :class:`EncoderError` saying why not."""
    cfg_path = folder / "config.json"
    cfg = read_config(folder, EncoderError, f"{folder} is not an encoder folder: no config.json. Pass a folder "
                      "written by save_pretrained of a transformers Dinov2Model (or by `deltafm train-encoder`)")
    found = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
    if found not in DINOV2_TYPES:
        raise EncoderError(f"{cfg_path}: model_type is {found!r}, expected one of {', '.join(map(repr, DINOV2_TYPES))} "
                           "(deltafm loads DINOv2 encoders: facebook/dinov2-*, or one from `deltafm train-encoder`)")
    require_weights(folder, EncoderError)
    return cfg


def read_mean_std(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``image_mean`` / ``image_std`` of ``folder/preprocessor_config.json`` (ImageNet's when the file or a
    key is absent)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return IMAGENET_MEAN, IMAGENET_STD
    pre = read_json(path, EncoderError)
    if not isinstance(pre, dict):
        raise EncoderError(f"{path}: expected a JSON object with image_mean and image_std")
    return check_mean_std(pre.get("image_mean", IMAGENET_MEAN), pre.get("image_std", IMAGENET_STD), str(path))


def hf_identity(model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> str:
    """``<class>:<16 hex>``: :func:`~deltafm.encoders.base.state_digest` of the config (without private and
    bookkeeping keys), the normalisation and every parameter and buffer."""
    cfg = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in _BOOKKEEPING}
    meta = {"config": cfg, "image_mean": list(mean), "image_std": list(std)}
    return state_digest(type(model).__name__, meta, model.state_dict())


def _patch_size(cfg: Any, where: str) -> int:
    p = cfg.patch_size
    if isinstance(p, list | tuple):
        if len(set(p)) != 1:
            raise EncoderError(f"{where}: patch_size {list(p)} is not square; REPA encoders use square patches")
        p = p[0]
    return int(p)


class Dinov2Encoder(ImageEncoder):
    """A transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` as a frozen :class:`ImageEncoder`
    (see the module docstring). ``source`` is the folder it was loaded from."""

    def __init__(self, model: nn.Module, name: str, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD, source: str | None = None) -> None:
        cfg = model.config
        where = source or type(model).__name__
        if int(getattr(cfg, "num_channels", 3)) != 3:
            raise EncoderError(f"{where}: the model takes {cfg.num_channels} input channels; "
                               "REPA encoders take RGB (3) images")
        super().__init__(name, int(cfg.hidden_size), mean, std, patch_size=_patch_size(cfg, where))
        self.model = model
        self.prefix_tokens = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.source = source
        self.freeze()
        self.identity = hf_identity(model, self.image_mean, self.image_std)

    def encode(self, pixels: Tensor) -> Tensor:
        return self.model(pixel_values=pixels).last_hidden_state[:, self.prefix_tokens:]


def _import_class(model_type: str) -> Any:
    try:
        import transformers
    except ImportError:
        raise EncoderError("REPA encoders need the package transformers: pip install 'deltafm[repa]' "
                           "(or pip install transformers)") from None
    return getattr(transformers, DINOV2_TYPES[model_type])


def load_dinov2(folder: str | Path, *, name: str | None = None, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> Dinov2Encoder:
    """Load a DINOv2 folder (``save_pretrained`` of ``Dinov2Model`` / ``Dinov2WithRegistersModel``, or of a
    model that contains one, e.g. ``Dinov2ForImageClassification``) as a frozen encoder on ``device``.

    ``name`` defaults to the folder's name (sanitised). Raises :class:`EncoderError` when the folder is not
    a DINOv2 folder, the weights are missing or damaged, or transformers is not installed."""
    folder = Path(folder)
    cfg = check_dinov2_folder(folder)
    mean, std = read_mean_std(folder)
    cls = _import_class(cfg["model_type"])
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True)  # saved dtype ("auto" in v5); cast below
    except Exception as e:  # damaged files fail in many classes (safetensors, torch.load, shapes)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise EncoderError(f"{folder}: cannot load the {DINOV2_TYPES[cfg['model_type']]} weights "
                           f"({type(e).__name__}: {first})") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    model.to(device=device, dtype=dtype)
    src = str(folder.resolve())
    return Dinov2Encoder(model, name if name is not None else encoder_name(folder.resolve().name), mean, std, src)
