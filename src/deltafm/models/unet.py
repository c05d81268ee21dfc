"""A small ADM-style convolutional UNet predicting a velocity, called as ``model(x, t, cond)``.

Conditioning: e = MLP(sinusoidal(time_scale · t)) + ClassTable[cond] (width E = 4 · base_channels,
row ``num_classes`` of the table is the learned null class). Every residual block injects e by a
scale-shift of its second normalisation:

    h = Conv(SiLU(GN(x)))
    (s, b) = Linear(SiLU(e))
    h = Conv₀(Dropout(SiLU(GN(h) ⊙ (1 + s) + b)))          (Conv₀ zero-initialised)
    out = Skip(x) + h                                      (Skip = 1×1 conv when widths differ)

Levels ℓ = 0 … L−1 have width base · channel_mult[ℓ] and resolution H / 2^ℓ (stride-2 conv down,
nearest ×2 + conv up, so each side must be divisible by 2^(L−1)); levels listed in ``attn_levels``
(and the middle) also get multi-head self-attention with a zero-initialised output projection.
The decoder concatenates the encoder activations (UNet skips). The output conv is zero-initialised,
so a fresh model outputs exactly zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltafm.models.layers import ClassEmbedder, TimestepEmbedder, check_time, count_forward_flops, pair

__all__ = ["UNet"]


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with gcd(groups, channels) groups, so any width works."""
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """Residual block with scale-shift conditioning (see the module docstring)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch))
        self.norm2 = _norm(out_ch, groups)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(e)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """x + Proj₀(MHSA(GN(x))) over the H·W positions; Proj₀ is zero-initialised."""

    def __init__(self, ch: int, num_heads: int, groups: int) -> None:
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"attention width {ch} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = _norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, HW, c/heads)
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Stride-2 3×3 conv: (H, W) → (H/2, W/2)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest ×2 then 3×3 conv: (H, W) → (2H, 2W)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level of encoder or decoder: residual blocks, each optionally followed by attention."""

    def __init__(self) -> None:
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()


def _check_levels(channel_mult: tuple[int, ...], attn_levels: tuple[int, ...]) -> int:
    """Number of resolution levels; ValueError for an empty ``channel_mult`` or out-of-range attention levels."""
    levels = len(channel_mult)
    if levels < 1:
        raise ValueError("channel_mult needs at least one level")
    bad_attn = [a for a in attn_levels if not 0 <= a < levels]
    if bad_attn:
        raise ValueError(f"attn_levels {bad_attn} out of range for {levels} levels")
    return levels


class UNet(nn.Module):
    """ADM-style class-conditional UNet.

    Args:
        in_channels: C of the input and of the output velocity.
        image_size: H = W (int) or (H, W); each side must be divisible by 2^(len(channel_mult) − 1).
        num_classes: real classes; the table has ``num_classes + 1`` rows (last = learned null class).
        base_channels: width of level 0; level ℓ has ``base_channels · channel_mult[ℓ]``.
        channel_mult: width multipliers, one per resolution level.
        num_res_blocks: residual blocks per encoder level (the decoder has one more, as in ADM).
        attn_levels: level indices that get self-attention after each residual block.
        num_heads: attention heads.
        dropout: dropout inside the residual blocks.
        norm_groups: GroupNorm groups (gcd with the width is used).
        time_scale: t ∈ [0, 1] is fed to the sinusoid as ``time_scale · t`` (ADM-like: 1000).
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int | tuple[int, int] = 28,
        num_classes: int = 10,
        base_channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 2,
        attn_levels: tuple[int, ...] = (2,),
        num_heads: int = 4,
        dropout: float = 0.0,
        norm_groups: int = 8,
        time_scale: float = 1000.0,
    ) -> None:
        super().__init__()
        h, w = pair(image_size)
        levels = _check_levels(channel_mult, attn_levels)
        self.factor = 2 ** (levels - 1)
        self._check_size(h, w)
        self.config = dict(
            in_channels=in_channels, image_size=(h, w), num_classes=num_classes,
            base_channels=base_channels, channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
            attn_levels=tuple(attn_levels), num_heads=num_heads, dropout=dropout, norm_groups=norm_groups,
            time_scale=time_scale,
        )  # fmt: skip
        self.in_channels = in_channels
        self.image_size = (h, w)
        self.num_classes = num_classes
        emb_dim = 4 * base_channels

        self.t_embedder = TimestepEmbedder(emb_dim, freq_dim=base_channels, time_scale=time_scale)
        self.y_embedder = ClassEmbedder(num_classes, emb_dim)
        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def res(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, emb_dim, dropout, norm_groups)

        def attn(c: int, on: bool) -> nn.Module:
            return AttnBlock(c, num_heads, norm_groups) if on else nn.Identity()

        ch = base_channels
        skip_chs = [ch]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for lvl, mult in enumerate(channel_mult):
            level = Level()
            for _ in range(num_res_blocks):
                level.res.append(res(ch, base_channels * mult))
                ch = base_channels * mult
                level.attn.append(attn(ch, lvl in attn_levels))
                skip_chs.append(ch)
            self.down.append(level)
            if lvl < levels - 1:
                self.downsample.append(Downsample(ch))
                skip_chs.append(ch)

        self.mid_res1 = res(ch, ch)
        self.mid_attn = attn(ch, True)
        self.mid_res2 = res(ch, ch)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for lvl, mult in reversed(list(enumerate(channel_mult))):
            level = Level()
            for _ in range(num_res_blocks + 1):
                level.res.append(res(ch + skip_chs.pop(), base_channels * mult))
                ch = base_channels * mult
                level.attn.append(attn(ch, lvl in attn_levels))
            self.up.append(level)
            if lvl > 0:
                self.upsample.append(Upsample(ch))

        self.out_norm = _norm(ch, norm_groups)
        self.out_conv = nn.Conv2d(ch, in_channels, 3, padding=1)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        """Class id of the learned unconditional embedding (== num_classes)."""
        return self.num_classes

    def initialize_weights(self) -> None:
        """All initialisation in one place.

        Convs and linears keep PyTorch's default (Kaiming-uniform) init; the class table is N(0, 0.02²);
        the last conv of every residual branch, every attention output projection and the output conv
        are zero (as in ADM), so every block is the identity and the output is 0 at initialisation.
        """
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.weight)
                nn.init.zeros_(m.conv2.bias)
            elif isinstance(m, AttnBlock):
                nn.init.zeros_(m.proj.weight)
                nn.init.zeros_(m.proj.bias)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def _check_size(self, h: int, w: int) -> None:
        if h % self.factor or w % self.factor:
            raise ValueError(
                f"image size {h}x{w} is not supported: with {int(math.log2(self.factor)) + 1} resolution "
                f"levels each side must be divisible by {self.factor}"
            )

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Velocity v(x, t, cond) of shape (B, C, H, W)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        self._check_size(x.shape[2], x.shape[3])
        t = check_time(t, x.shape[0], x.device)
        e = self.t_embedder(t) + self.y_embedder(cond)

        h = self.input_conv(x)
        skips = [h]
        for lvl, level in enumerate(self.down):
            for res, attn in zip(level.res, level.attn):
                h = attn(res(h, e))
                skips.append(h)
            if lvl < len(self.downsample):
                h = self.downsample[lvl](h)
                skips.append(h)

        h = self.mid_res2(self.mid_attn(self.mid_res1(h, e)), e)

        for i, level in enumerate(self.up):
            for res, attn in zip(level.res, level.attn):
                h = attn(res(torch.cat([h, skips.pop()], dim=1), e))
            if i < len(self.upsample):
                h = self.upsample[i](h)
        return self.out_conv(F.silu(self.out_norm(h)))

    def flops_per_sample(self) -> int:
        """Forward FLOPs for one sample at ``image_size`` (convs, linears, attention; 2·m·n·k each).

        Counted on a meta-device twin, so it costs no compute. Training ≈ 3× this.
        """
        with torch.device("meta"):
            twin = UNet(**self.config)
            x = torch.zeros(1, self.in_channels, *self.image_size)
            t = torch.zeros(1)
            y = torch.zeros(1, dtype=torch.long)
        return count_forward_flops(lambda: twin(x, t, y))
