"""REPA: representation alignment of a transformer's hidden tokens to a frozen encoder's patch tokens.

REPA (Yu et al., 2025) adds to the flow-matching loss a term that makes the tokens h ∈ R^{N×D} output by
block k of the SiT (``encoder_depth = k``, 1-based) predict, through a small MLP projector
h_φ: R^D → R^{D_e}, the patch tokens y ∈ R^{N×D_e} of a pretrained encoder (DINOv2) of the *clean*
image. With E encoders (one projector each), a batch of B samples and N tokens per sample::

    L_REPA = − (1 / (E·B·N)) Σ_e Σ_i Σ_n  cos( h_φe(h_{i,n}),  y^e_{i,n} )        cos(a, b) = a·b / (‖a‖‖b‖)

and the training loss is ``L_FM-or-ΔFM + proj_coeff · L_REPA`` (REPA's ``proj_coeff`` 0.5). The
projector is REPA's three linear layers with SiLU between them (width ``projector_dim``, 2048 by default).

The token grids must agree: encoders are run at an input size that gives the SiT's grid (DINOv2-B/14 at
224 px for 16×16 tokens: REPA's rule for SiT/2 on 256 px images); precomputed features stored at another
grid are resampled by :func:`match_token_grid` (bilinear on the 2-D grid), and a token count that is not
a square grid is an error.

:class:`AlignedModel` wraps a backbone that can return its hidden tokens (``SiT(...,
return_features=[k − 1])``) together with the projectors; ``model(x, t, cond)`` is the backbone's
velocity (so sampling is unchanged) and ``model(x, t, cond, align=True)`` also returns the projected
tokens, through ``forward`` so DDP sees one forward per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .conditioning import Cond

__all__ = ["AlignedModel", "alignment_loss", "build_projector", "match_token_grid", "square_grid"]


def build_projector(hidden_size: int, projector_dim: int, out_dim: int) -> nn.Sequential:
    """REPA's projector: Linear(D, P) → SiLU → Linear(P, P) → SiLU → Linear(P, D_e), applied per token."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, out_dim),
    )  # fmt: skip


def alignment_loss(projected: Sequence[Tensor], targets: Sequence[Tensor], per_sample: bool = False) -> Tensor:
    """REPA's loss: minus the cosine similarity of projected and target tokens, averaged over encoders,
    tokens and (unless ``per_sample``) samples. Each pair is (B, N, D_e); computed in fp32.

    Returns a scalar, or (B,) per-sample values when ``per_sample``."""
    if len(projected) != len(targets) or not projected:
        raise ValueError(f"need one target per projector, got {len(projected)} projected and {len(targets)} targets")
    total = None
    for p, z in zip(projected, targets):
        if p.shape != z.shape:
            raise ValueError(f"projected tokens {tuple(p.shape)} and encoder tokens {tuple(z.shape)} differ in shape")
        cos = (F.normalize(p.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(dim=-1)  # (B, N)
        term = -cos.mean(dim=1)
        total = term if total is None else total + term
    assert total is not None
    total = total / len(projected)
    return total if per_sample else total.mean()


def square_grid(n: int) -> int:
    """The side g of a square token grid with n = g² tokens; ValueError when n is not a square."""
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{n} tokens do not form a square grid; cannot match them to another grid")
    return g


def match_token_grid(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Tokens (B, N, D) on a square grid (raster order) resampled to ``grid`` = (gh, gw): unchanged when
    N = gh·gw and the grid is square; otherwise bilinear interpolation on the 2-D grid
    (``align_corners=False``), returned as (B, gh·gw, D)."""
    b, n, d = tokens.shape
    gh, gw = grid
    if n == gh * gw and gh == gw:
        return tokens
    g = square_grid(n)
    img = tokens.transpose(1, 2).reshape(b, d, g, g)
    out = F.interpolate(img.float(), size=(gh, gw), mode="bilinear", align_corners=False).to(tokens.dtype)
    return out.reshape(b, d, gh * gw).transpose(1, 2)


class AlignedModel(nn.Module):
    """A velocity backbone plus REPA projectors on the tokens of its block ``encoder_depth`` (1-based).

    The backbone must accept ``return_features=[i]`` (0-based block indices) and return ``(v, [h])``
    with h of shape (B, N, D): :class:`deltafm.models.sit.SiT` does. ``z_dims`` are the encoders' token
    widths, one projector each. ``forward(x, t, cond)`` returns the velocity only;
    ``forward(x, t, cond, align=True)`` returns ``(v, [h_φe(h) for each encoder])``.
    """

    def __init__(self, backbone: nn.Module, z_dims: Sequence[int], encoder_depth: int = 8,
                 projector_dim: int = 2048) -> None:
        super().__init__()
        depth = getattr(backbone, "depth", None)
        hidden = getattr(backbone, "hidden_size", None)
        if depth is None or hidden is None:
            raise ValueError(f"REPA needs a transformer backbone that returns its hidden tokens (SiT); "
                             f"{type(backbone).__name__} does not")
        if not 1 <= encoder_depth <= depth:
            raise ValueError(f"repa.encoder_depth must be in [1, {depth}] (the backbone's blocks), got {encoder_depth}")
        if not z_dims:
            raise ValueError("REPA needs at least one encoder")
        self.backbone = backbone
        self.encoder_depth = int(encoder_depth)
        self.projectors = nn.ModuleList(build_projector(hidden, projector_dim, int(d)) for d in z_dims)
        for m in self.projectors.modules():  # REPA's init: Xavier-uniform weights, zero biases
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            backbone = self.__dict__.get("_modules", {}).get("backbone")
            if backbone is None:
                raise
            return getattr(backbone, name)  # image_size, null_class, flops_per_sample, ...

    @property
    def grid(self) -> tuple[int, int]:
        """The backbone's token grid (gh, gw)."""
        return tuple(self.backbone.grid)  # type: ignore[return-value]

    def forward(self, x: Tensor, t: Tensor, cond: Cond | None, align: bool = False):
        if not align:
            return self.backbone(x, t, cond)
        v, (h,) = self.backbone(x, t, cond, return_features=[self.encoder_depth - 1])
        return v, [proj(h) for proj in self.projectors]
