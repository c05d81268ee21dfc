"""SiT: the Scalable interpolant Transformer (DiT architecture) predicting a velocity.

The image x (B, C, H, W) is cut into p×p patches, each linearly embedded to a token of width D
(a stride-p convolution) plus a fixed 2-D sin-cos position code. The conditioning vector

    c = TimestepMLP(sinusoidal(t)) + ClassTable[cond]          (cond = num_classes is the null class)

drives every block through adaLN-Zero: from c a zero-initialised linear layer produces
(shift₁, scale₁, gate₁, shift₂, scale₂, gate₂) and the block computes

    x ← x + gate₁ ⊙ Attn(LN(x) ⊙ (1 + scale₁) + shift₁)
    x ← x + gate₂ ⊙ MLP (LN(x) ⊙ (1 + scale₂) + shift₂)

so each block is the identity at initialisation. A final adaLN layer and a zero-initialised linear
map tokens back to p·p·C values that are reassembled ("unpatchified") into the velocity. A freshly
initialised SiT therefore outputs exactly zero.

Sizes follow the DiT/SiT papers (S, B, L, XL with patch 2, 4, 8); ``learn_sigma=True`` adds C extra
output channels (discarded by ``forward``) only so parameter counts match the published ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltafm.conditioning import MultiCond
from deltafm.models.layers import (
    ClassEmbedder,
    MultiClassEmbedder,
    TimestepEmbedder,
    check_time,
    count_forward_flops,
    pair,
)

__all__ = ["ATTN_IMPLS", "Attention", "SiT", "SiTBlock", "sincos_pos_embed_2d"]


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(n,) positions → (n, dim) as [sin(pos·ω_i), cos(pos·ω_i)], ω_i = 10000^(−2i/dim)."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    args = pos.double()[:, None] * omega[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D position code of shape (grid_h·grid_w, dim), rows in raster order (y outer, x inner).

    Half the channels encode the row index y, half the column index x, each with ``_sincos_1d``.
    """
    if dim % 4:
        raise ValueError(f"hidden size must be divisible by 4 for the 2-D sin-cos code, got {dim}")
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    emb = torch.cat([_sincos_1d(dim // 2, ys.reshape(-1)), _sincos_1d(dim // 2, xs.reshape(-1))], dim=1)
    return emb.float()


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x ⊙ (1 + scale) + shift, with (B, D) shift/scale broadcast over the tokens of x (B, N, D)."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


ATTN_IMPLS = ("sdpa", "matmul")


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection: softmax(q kᵀ / √d_head) v per head.

    ``impl="sdpa"`` (default) calls PyTorch's fused ``scaled_dot_product_attention``, which keeps
    the logits q kᵀ and the softmax in fp32 even for bf16 inputs. ``impl="matmul"`` spells the same
    formula as three plain ops, S = (q/√d) kᵀ, P = softmax(S), P v (timm's non-fused path): identical
    in exact arithmetic, but under bf16 autocast S is rounded to bf16 (relative error ≤ 2⁻⁹ per
    logit), which is a precision change; on this CPU it is about 1.8× faster in bf16 (see
    benchmarks/RESULTS.md), so it is an opt-in, never the default.
    """

    def __init__(self, dim: int, num_heads: int, impl: str = "sdpa") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        self.num_heads = num_heads
        self.impl = impl
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) → (B, N, D); softmax(q kᵀ / √d_head) v per head."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Linear(D, r·D) → GELU(tanh) → Linear(r·D, D)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (see the module docstring)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_impl: str = "sdpa") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_impl)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, N, D), c (B, D) → (B, N, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1[:, None, :] * self.attn(_modulate(self.norm1(x), shift1, scale1))
        x = x + gate2[:, None, :] * self.mlp(_modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale from c) then a linear map from D to p·p·C_out values per token."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class SiT(nn.Module):
    """Class-conditional SiT velocity model, called as ``model(x, t, cond)``.

    Args:
        in_channels: C of the input (and of the output velocity).
        image_size: H = W (int) or (H, W); each must be divisible by ``patch_size``.
        patch_size: side p of the square patches; the sequence has N = (H/p)(W/p) tokens.
        hidden_size, depth, num_heads, mlp_ratio: transformer width D, number of blocks, heads, MLP
            expansion.
        num_classes: number of real classes; the class table has ``num_classes + 1`` rows, the last
            being the learned null class.
        learn_sigma: add C output channels as in DiT (ignored by ``forward``), for parameter parity.
        time_scale: t is fed to the sinusoidal embedding as ``time_scale · t`` (SiT uses 1).
        freq_dim: width of the sinusoidal time features.
        attn_impl: ``"sdpa"`` (default, fused kernel) or ``"matmul"`` (plain ops, bf16 logits under
            autocast; faster in bf16 on CPU), see ``Attention``.
        conditions: several named class-id conditions instead of one class (name → number of values);
            ``cond`` is then a :class:`~deltafm.conditioning.MultiCond` and c adds one learned table per
            name (:class:`~deltafm.models.layers.MultiClassEmbedder`); ``num_classes`` is not used.
    """

    def __init__(
        self,
        *,
        in_channels: int = 4,
        image_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        time_scale: float = 1.0,
        freq_dim: int = 256,
        attn_impl: str = "sdpa",
        conditions: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        h, w = pair(image_size)
        if h % patch_size or w % patch_size:
            raise ValueError(
                f"image size {h}x{w} is not divisible by the patch size {patch_size}; "
                f"pick a patch size that divides both sides"
            )
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.config = dict(
            in_channels=in_channels, image_size=(h, w), patch_size=patch_size, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
            learn_sigma=learn_sigma, time_scale=time_scale, freq_dim=freq_dim, attn_impl=attn_impl,
        )  # fmt: skip
        if conditions is not None:  # only then, so class-conditional configs stay as they were
            self.config["conditions"] = dict(conditions)
        self.conditions = dict(conditions) if conditions is not None else None
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.image_size = (h, w)
        self.patch_size = patch_size
        self.grid = (h // patch_size, w // patch_size)
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        self.depth = depth

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_dim=freq_dim, time_scale=time_scale)
        self.y_embedder: ClassEmbedder | MultiClassEmbedder = (
            ClassEmbedder(num_classes, hidden_size) if conditions is None
            else MultiClassEmbedder(conditions, hidden_size)
        )
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, *self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio, attn_impl) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        """Class id of the learned unconditional embedding (== num_classes)."""
        return self.num_classes

    def initialize_weights(self) -> None:
        """All initialisation in one place (as in DiT).

        Linear layers: Xavier-uniform weights, zero bias. Patch embedding: Xavier-uniform on the
        conv weight viewed as a (D, C·p·p) matrix. Class table and time MLP: N(0, 0.02²).
        adaLN modulation of every block and of the final layer, and the final linear: zero
        (adaLN-Zero), so every block is the identity and the output is 0 at initialisation.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        tables = [self.y_embedder] if isinstance(self.y_embedder, ClassEmbedder) else self.y_embedder.tables.values()
        for table in tables:
            nn.init.normal_(table.table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p·p·C) → (B, C, H, W), inverse of the raster patch order.

        Token n = i·gw + j, value (u, v, ch) goes to pixel (ch, i·p + u, j·p + v): a view as
        (B, gh, gw, p, p, C), one permute to (B, C, gh, p, gw, p) and one reshape (values as the einsum it replaced).
        """
        b = x.shape[0]
        p, (gh, gw), c = self.patch_size, self.grid, self.out_channels
        x = x.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, gh * p, gw * p)

    def _check_features(self, return_features: Sequence[int]) -> list[int]:
        idx = [int(i) for i in return_features]
        bad = [i for i in idx if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"return_features indices must lie in [0, {self.depth - 1}], got {bad}")
        return idx

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | MultiCond,
        return_features: Sequence[int] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Velocity v(x, t, cond) of shape (B, C, H, W).

        ``return_features``: 0-based block indices i; the tokens (B, N, D) output by block i are
        returned too, in the order asked, as ``(velocity, features)``. REPA's ``encoder_depth = k``
        (projection after the k-th block) is index ``k − 1``.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.image_size:
            raise ValueError(
                f"expected input (B, {self.in_channels}, {self.image_size[0]}, {self.image_size[1]}), "
                f"got {tuple(x.shape)}"
            )
        want = self._check_features(return_features) if return_features is not None else []
        t = check_time(t, x.shape[0], x.device)
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(cond)
        feats: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            h = block(h, c)
            if i in want:
                feats[i] = h
        out = self.unpatchify(self.final_layer(h, c))
        if self.out_channels != self.in_channels:
            out = out[:, : self.in_channels]
        if return_features is None:
            return out
        return out, [feats[i] for i in want]

    def flops_per_sample(self) -> int:
        """Forward FLOPs for one sample (matmuls, convs and attention, 2·m·n·k each).

        Counted by running this architecture on the meta device, so it costs no compute. For
        training, forward + backward ≈ 3× this. Dominant terms: depth · (24·N·D² + 4·N²·D).
        """
        with torch.device("meta"):
            twin = SiT(**self.config)
            h, w = self.image_size
            x = torch.zeros(1, self.in_channels, h, w)
            t = torch.zeros(1)
            y = torch.zeros(1, dtype=torch.long)
        if self.conditions is not None:
            from deltafm.conditioning import Labels, MultiCond

            y = MultiCond({k: Labels(torch.zeros(1, dtype=torch.long, device="meta"), n)
                           for k, n in self.conditions.items()})
        return count_forward_flops(lambda: twin(x, t, y))
