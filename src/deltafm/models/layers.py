"""Building blocks shared by the image backbones: time and class embeddings, checks, FLOP counting.

Conventions: ``t`` has shape (B,) with t ∈ [0, 1] (t = 0 noise, t = 1 data); ``cond`` is a LongTensor
(B,) of class ids in ``[0, num_classes]`` where the id ``num_classes`` is the learned null class used
for classifier-free guidance. Label dropout happens in the objective, never in a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from deltafm.checks import validation_enabled

__all__ = [
    "ClassEmbedder",
    "MultiClassEmbedder",
    "TimestepEmbedder",
    "check_time",
    "count_forward_flops",
    "pair",
    "sinusoidal_embedding",
]


def pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Return ``(height, width)`` from an int or a 2-sequence; raise ValueError otherwise."""
    if isinstance(size, int):
        hw = (size, size)
    else:
        hw = tuple(int(s) for s in size)
        if len(hw) != 2:
            raise ValueError(f"image_size must be an int or (height, width), got {size!r}")
    if min(hw) <= 0:
        raise ValueError(f"image_size must be positive, got {size!r}")
    return hw  # type: ignore[return-value]


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of a scalar per sample.

    With half = dim // 2 and frequencies ω_i = max_period^(−i / half), i = 0 … half − 1,

        emb(t) = [cos(ω_0 t), …, cos(ω_{half−1} t), sin(ω_0 t), …, sin(ω_{half−1} t)]

    (a zero column is appended when ``dim`` is odd). ``t`` has shape (B,); the result (B, dim) is fp32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t ↦ MLP(sinusoidal(time_scale · t)): Linear(freq_dim, dim) → SiLU → Linear(dim, dim).

    ``time_scale`` maps t ∈ [0, 1] to the range the sinusoid sees: SiT/REPA feed t ∈ [0, 1] directly
    (time_scale = 1); ADM-style nets use integer-like steps (time_scale = 1000).
    """

    def __init__(self, dim: int, freq_dim: int = 256, time_scale: float = 1.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time_scale = float(time_scale)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) → (B, dim)."""
        freq = sinusoidal_embedding(t * self.time_scale, self.freq_dim)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class ClassEmbedder(nn.Module):
    """Lookup table with ``num_classes + 1`` rows; row ``num_classes`` is the learned null class.

    Ids outside ``[0, num_classes]`` raise ValueError (checked in eager mode; skipped while
    ``torch.compile`` traces, so the check never breaks a graph, on the meta device, and inside
    :func:`deltafm.checks.validation_disabled`, where the training loop runs its steps: the check reads
    tensor values, a host sync).
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    @property
    def null_class(self) -> int:
        """The id of the learned unconditional ("null") class."""
        return self.num_classes

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """(B,) long → (B, dim)."""
        if cond.dtype.is_floating_point or cond.dtype == torch.bool:
            raise ValueError(f"cond must hold integer class ids, got dtype {cond.dtype}")
        if cond.ndim != 1:
            raise ValueError(f"cond must have shape (B,), got {tuple(cond.shape)}")
        if (validation_enabled() and not torch.compiler.is_compiling() and cond.numel() > 0
                and cond.device.type != "meta"):
            lo, hi = int(cond.min()), int(cond.max())
            if lo < 0 or hi > self.num_classes:
                raise ValueError(
                    f"class ids must lie in [0, {self.num_classes}] (id {self.num_classes} is the null "
                    f"class); got ids in [{lo}, {hi}]"
                )
        return self.table(cond)


class MultiClassEmbedder(nn.Module):
    """Several named class-id conditions: c_y = Σ_k Table_k[ids_k], one :class:`ClassEmbedder` per name.

    ``conditions`` maps each name to its number of values K_k (row K_k of table k is that condition's
    learned null). The input is a :class:`~deltafm.conditioning.MultiCond` whose parts are exactly these
    names, each :class:`~deltafm.conditioning.Labels` with the same K_k (checked, with clear errors).
    """

    def __init__(self, conditions: dict[str, int], dim: int) -> None:
        super().__init__()
        if not conditions:
            raise ValueError("MultiClassEmbedder needs at least one condition")
        self.conditions = {str(k): int(v) for k, v in conditions.items()}
        self.tables = nn.ModuleDict({k: ClassEmbedder(v, dim) for k, v in self.conditions.items()})

    def forward(self, cond: object) -> torch.Tensor:
        """MultiCond of Labels parts → (B, dim)."""
        from deltafm.conditioning import Labels, MultiCond

        if not isinstance(cond, MultiCond):
            raise ValueError(f"this model is conditioned on {list(self.conditions)} and needs a MultiCond, got "
                             f"{type(cond).__name__}")
        if set(cond.names) != set(self.conditions):
            raise ValueError(f"this model is conditioned on {sorted(self.conditions)}, got {sorted(cond.names)}")
        out = None
        for name, k in self.conditions.items():
            part = cond[name]
            if not isinstance(part, Labels) or part.num_classes != k:
                got = f"Labels with {part.num_classes} values" if isinstance(part, Labels) else type(part).__name__
                raise ValueError(f"condition {name!r} must be Labels with {k} values, got {got}")
            emb = self.tables[name](part.ids)
            out = emb if out is None else out + emb
        assert out is not None
        return out


def check_time(t: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """Return t as a (B,) tensor; a 0-d tensor or float is broadcast to the batch."""
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(float(t), device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},) to match the batch, got {tuple(t.shape)}")
    return t


def count_forward_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmul-like ops (linear, bmm, conv, attention) run by ``fn()``.

    A matmul of (m, k) by (k, n) counts 2·m·n·k; elementwise ops, norms and softmax count 0.
    Run ``fn`` on meta tensors to count a model of any size without computing anything.
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
