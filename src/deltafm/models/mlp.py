"""Conditional MLP velocity models for low-dimensional (toy) data: ``model(x, t, cond) -> v``.

``x`` (B, dim), ``t`` (B,) in [0, 1] (t = 0 source, t = 1 data), ``cond`` (B,) long class ids in
[0, num_classes]; the id ``num_classes`` is the learned null class (label dropout for classifier-free
guidance happens in the objective, never here).

Two ways to condition:

* ``conditioning="add"`` (the ΔFM reference notebook's design): a table E of shape
  (num_classes + 1, dim + 1), initialised N(0, 1), is *added* to the input [x, t]:
  h_0 = [x, t] + E[cond], followed by ``depth`` hidden layers and a linear read-out.
* ``conditioning="concat"``: h_0 = [x, φ(t), E[cond]] with φ(t) sinusoidal time features
  (sin, cos of 2^j π t, j < ``time_features``) and E of shape (num_classes + 1, embed_dim).

Presets (:func:`build_toy_mlp`): ``reference`` — add-conditioning, 2 hidden tanh layers of width 64,
the spirit of the reference notebook's small tanh MLP; ``wide`` — concat-conditioning, 3 hidden SiLU
layers of width 256.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["ConditionalMLP", "MLP_PRESETS", "build_toy_mlp"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}


class ConditionalMLP(nn.Module):
    """Class-conditional MLP velocity field (see the module docstring for the two conditionings)."""

    def __init__(
        self,
        num_classes: int,
        dim: int = 2,
        hidden: int = 64,
        depth: int = 2,
        activation: str = "tanh",
        conditioning: str = "add",
        embed_dim: int = 32,
        time_features: int = 8,
    ) -> None:
        super().__init__()
        if conditioning not in ("add", "concat"):
            raise ValueError(f"conditioning must be 'add' or 'concat', got {conditioning!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        if num_classes < 0 or depth < 1 or hidden < 1:
            raise ValueError("need num_classes >= 0, depth >= 1 and hidden >= 1")
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.conditioning = conditioning
        self.time_features = int(time_features)
        if conditioning == "add":
            self.embed = nn.Embedding(num_classes + 1, dim + 1)
            in_features = dim + 1
        else:
            self.embed = nn.Embedding(num_classes + 1, embed_dim)
            in_features = dim + 2 * self.time_features + embed_dim
        nn.init.normal_(self.embed.weight, 0.0, 1.0)
        act = _ACTIVATIONS[activation]
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), act()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    @property
    def null_class(self) -> int:
        """Id of the learned unconditional class."""
        return self.num_classes

    def _time_features(self, t: Tensor) -> Tensor:
        freqs = math.pi * 2.0 ** torch.arange(self.time_features, dtype=t.dtype, device=t.device)
        ang = t[:, None] * freqs[None, :]
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Velocity v(x, t | cond): (B, dim), (B,), (B,) long -> (B, dim)."""
        b = x.shape[0]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must have shape ({b},), got {tuple(t.shape)}")
        if cond.shape != (b,) or cond.dtype.is_floating_point or cond.dtype == torch.bool:
            raise ValueError(f"cond must be integer class ids of shape ({b},)")
        if b and (int(cond.min()) < 0 or int(cond.max()) > self.num_classes):
            raise ValueError(f"class ids must lie in [0, {self.num_classes}] (null id {self.num_classes})")
        t = t.to(x.dtype)
        e = self.embed(cond).to(x.dtype)
        if self.conditioning == "add":
            h = torch.cat([x, t[:, None]], dim=1) + e
        else:
            h = torch.cat([x, self._time_features(t), e], dim=1)
        return self.net(h)


MLP_PRESETS: dict[str, dict] = {
    "reference": dict(hidden=64, depth=2, activation="tanh", conditioning="add"),
    "wide": dict(hidden=256, depth=3, activation="silu", conditioning="concat", embed_dim=32, time_features=8),
}


def build_toy_mlp(preset: str, num_classes: int, dim: int = 2, **overrides) -> ConditionalMLP:
    """Build a :class:`ConditionalMLP` preset (``reference`` or ``wide``); ``overrides`` replace fields."""
    if preset not in MLP_PRESETS:
        raise ValueError(f"unknown MLP preset {preset!r}; choose from {sorted(MLP_PRESETS)}")
    kwargs = {**MLP_PRESETS[preset], **overrides}
    return ConditionalMLP(num_classes=num_classes, dim=dim, **kwargs)
