"""Velocity models ``model(x, t, cond)``: SiT transformers, a small ADM-style UNet, the text-conditioned
MMDiT, and a name registry."""

from deltafm.models.mmdit import MMDiT
from deltafm.models.registry import build_model, list_models, model_preset
from deltafm.models.sit import SiT
from deltafm.models.unet import UNet

__all__ = ["MMDiT", "SiT", "UNet", "build_model", "list_models", "model_preset"]
