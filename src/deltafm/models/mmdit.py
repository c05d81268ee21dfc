"""MMDiT: the joint-attention transformer of Stable Diffusion 3, for text-to-image (and multi-condition) velocity.

Two token streams run side by side with their own weights: the **x stream** of N image patch tokens
(a stride-p convolution of x plus a fixed 2-D sin-cos position code, as in SiT) and the **context stream**
of L text tokens (a linear map of the text encoder's features, width ``text_dim`` → D). The conditioning
vector of every adaLN layer is

    c = TimestepMLP(sinusoidal(t)) + PooledMLP(pooled) + Σ_k Table_k[ids_k]

(the pooled text vector through Linear → SiLU → Linear; one learned table per named class-like condition,
row K_k of table k being that condition's null). Joint block j, for each stream s ∈ {ctx, x} with its own
modulation (shift₁, scale₁, gate₁, shift₂, scale₂, gate₂)_s = W_s c + b_s and hᵢ = LN(s) ⊙ (1 + scale₁) + shift₁:

    [q_s, k_s, v_s] = hᵢ W_qkv,s + b_qkv,s
    [a_ctx; a_x]   = softmax( [q_ctx; q_x] [k_ctx; k_x]ᵀ / √d_head + M ) [v_ctx; v_x]       (per head)
    s ← s + gate₁ ⊙ (a_s W_o,s + b_o,s)
    s ← s + gate₂ ⊙ MLP_s( LN(s) ⊙ (1 + scale₂) + shift₂ )

ONE attention over the concatenation [context; x], split back per stream. M is the key padding mask: 0 for
real text tokens and image tokens, −∞ for padded text tokens, so padding takes no part in anything (the
reference code, gstoica27/DeltaFM ``models/mmdit.py``, a copy of SD3's, attends without a mask and lets the
padding tokens' features act; we use the mask). The context stream of the last block is "pre-only": it only
supplies k and v (its projection has no q part, there is no output projection, MLP or context output), and
only the image tokens query. A final adaLN (shift, scale) and a linear map bring the image tokens back to
p·p·C values per patch.

**Null text** (``TextCond.null``, the unconditional branch of CFG): the row's token features and pooled
vector are replaced by learned ones, a single null context token (the other positions masked) and a null
pooled embedding, so the output of a null row does not depend on the features passed for it. Masked and
null positions are zeroed before the context embedding, so neither their values (NaN included) nor their
gradients reach anything.

**Initialisation** (adaLN-Zero, as SiT/DiT): every adaLN modulation linear and the final linear start at
zero, so each block leaves the image tokens unchanged and a fresh model outputs exactly 0.

**Sizes**: the reference's rule is D = 32·depth with depth heads (head width 32); ``hidden_size`` and
``num_heads`` default to it. The reference default, built by its text-to-image training script, is depth 24
(D = 768, 24 heads, patch 2, 768-wide CLIP text features, no pooled vector: ``pooled_dim=None``). Unlike
the reference, the pre-only context projection has no unused q weights (D² + D fewer parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltafm.conditioning import Labels, MultiCond, TextCond
from deltafm.models.layers import MultiClassEmbedder, TimestepEmbedder, check_time, count_forward_flops, pair
from deltafm.models.sit import FinalLayer, Mlp, sincos_pos_embed_2d

__all__ = ["JointBlock", "MMDiT", "StreamLayers", "mmdit_size"]


def mmdit_size(depth: int) -> tuple[int, int]:
    """The reference's sizing rule: (hidden D, heads) = (32·depth, depth), so every head is 32 wide."""
    return 32 * depth, depth


def _modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """h ⊙ (1 + scale) + shift, with (B, D) shift/scale broadcast over the tokens of h (B, L, D)."""
    return h * (1 + scale[:, None, :]) + shift[:, None, :]


class StreamLayers(nn.Module):
    """One stream's own weights inside a joint block: adaLN modulation, pre-norm and qkv projection before
    the joint attention; output projection, gated residual and the adaLN-modulated MLP after it.

    ``pre_only`` (the context stream of the last block): modulation (shift₁, scale₁) only and a k/v
    projection (no q); ``finish`` is then not available.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, pre_only: bool = False) -> None:
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if pre_only else 6) * dim))
        self.qkv = nn.Linear(dim, (2 if pre_only else 3) * dim, bias=qkv_bias)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def prepare(self, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """h (B, L, D), c (B, D) → (qkv (B, L, n·D) with n = 3, or 2 = [k, v] when pre-only; the modulation)."""
        mods = list(self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=-1))
        return self.qkv(_modulate(self.norm1(h), mods[0], mods[1])), mods

    def finish(self, h: torch.Tensor, attn: torch.Tensor, mods: list[torch.Tensor]) -> torch.Tensor:
        """h ← h + gate₁ ⊙ proj(attn); h ← h + gate₂ ⊙ MLP(LN(h) ⊙ (1 + scale₂) + shift₂)."""
        if self.pre_only:
            raise RuntimeError("a pre-only stream has no output")
        _, _, gate1, shift2, scale2, gate2 = mods
        h = h + gate1[:, None, :] * self.proj(attn)
        return h + gate2[:, None, :] * self.mlp(_modulate(self.norm2(h), shift2, scale2))


class JointBlock(nn.Module):
    """Joint attention block: a context stream and an x stream with separate weights, one attention over
    [context; x] (see the module docstring). ``context_pre_only`` makes it the last block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 context_pre_only: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.ctx_stream = StreamLayers(dim, mlp_ratio, qkv_bias, pre_only=context_pre_only)
        self.x_stream = StreamLayers(dim, mlp_ratio, qkv_bias)

    def _heads(self, t: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        """(B, L, n·D) → n tensors (B, heads, L, D/heads)."""
        b, length, nd = t.shape
        d = nd // n
        return t.reshape(b, length, n, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, ctx: torch.Tensor, x: torch.Tensor, c: torch.Tensor,
                key_mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """ctx (B, L, D), x (B, N, D), c (B, D), key_mask (B, L + N) bool (True = a key that takes part)
        → (new ctx, or None for a pre-only context stream; new x)."""
        pre_only = self.ctx_stream.pre_only
        ctx_qkv, ctx_mods = self.ctx_stream.prepare(ctx, c)
        x_qkv, x_mods = self.x_stream.prepare(x, c)
        qx, kx, vx = self._heads(x_qkv, 3)
        if pre_only:
            kc, vc = self._heads(ctx_qkv, 2)
            q = qx  # the context outputs would be discarded: only the image tokens query
        else:
            qc, kc, vc = self._heads(ctx_qkv, 3)
            q = torch.cat([qc, qx], dim=2)
        k, v = torch.cat([kc, kx], dim=2), torch.cat([vc, vx], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        out = out.transpose(1, 2).flatten(2)  # (B, Lq, D)
        n_ctx = 0 if pre_only else ctx.shape[1]
        x = self.x_stream.finish(x, out[:, n_ctx:], x_mods)
        return (None if pre_only else self.ctx_stream.finish(ctx, out[:, :n_ctx], ctx_mods)), x


def _unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], c: int) -> torch.Tensor:
    """(B, gh·gw, p·p·C) → (B, C, gh·p, gw·p): token i·gw + j, value (u, v, ch) → pixel (ch, i·p + u, j·p + v)."""
    gh, gw = grid
    x = x.reshape(x.shape[0], gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(x.shape[0], c, gh * p, gw * p)


class MMDiT(nn.Module):
    """Text-conditional MMDiT velocity model, called as ``model(x, t, cond)``.

    ``cond`` is a :class:`~deltafm.conditioning.TextCond`, or a :class:`~deltafm.conditioning.MultiCond`
    with exactly one TextCond part (any name) and one :class:`~deltafm.conditioning.Labels` part per name
    of ``conditions``. Class ids alone are refused (an MMDiT has no class table of its own).

    Args:
        in_channels, image_size, patch_size: as for SiT (N = (H/p)(W/p) image tokens).
        depth: number of joint blocks (the last one's context stream is pre-only).
        hidden_size, num_heads: width D and heads; default to the reference rule (32·depth, depth).
        mlp_ratio: MLP expansion of both streams.
        text_dim: width of the text token features (the text encoder's), mapped linearly to D.
        pooled_dim: width of the pooled text vector fed to c; None: no pooled vector (the reference's
            text-to-image setting), ``TextCond.pooled`` is then ignored.
        conditions: named class-like conditions (name → number of values), each a learned table added to c.
        max_text_tokens: the longest padded text accepted (77, CLIP's context); also the length
            ``flops_per_sample()`` counts by default. No text position code is added (the encoder's
            features carry positions), so it is a guard, not a size.
        num_classes: the dataset's class count, passed by ``build_model``; recorded only, never embedded
            (class-like inputs go through ``conditions``; text datasets report 0).
        qkv_bias, time_scale, freq_dim: q/k/v biases; t enters the sinusoid as ``time_scale·t``; its width.
    """

    def __init__(
        self,
        *,
        in_channels: int = 4,
        image_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        depth: int = 24,
        hidden_size: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        text_dim: int,
        pooled_dim: int | None,
        conditions: dict[str, int] | None = None,
        max_text_tokens: int = 77,
        num_classes: int = 0,
        qkv_bias: bool = True,
        time_scale: float = 1.0,
        freq_dim: int = 256,
    ) -> None:
        super().__init__()
        h, w = pair(image_size)
        if h % patch_size or w % patch_size:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch_size}; "
                             f"pick a patch size that divides both sides")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        rule_d, rule_heads = mmdit_size(depth)
        hidden_size = rule_d if hidden_size is None else hidden_size
        num_heads = rule_heads if num_heads is None else num_heads
        if text_dim < 1 or (pooled_dim is not None and pooled_dim < 1) or max_text_tokens < 1:
            raise ValueError(f"text_dim, pooled_dim and max_text_tokens must be >= 1, got {text_dim}, {pooled_dim}, "
                             f"{max_text_tokens}")
        self.config = dict(
            in_channels=in_channels, image_size=(h, w), patch_size=patch_size, depth=depth, hidden_size=hidden_size,
            num_heads=num_heads, mlp_ratio=mlp_ratio, text_dim=text_dim, pooled_dim=pooled_dim,
            conditions=dict(conditions) if conditions else None, max_text_tokens=max_text_tokens,
            num_classes=num_classes, qkv_bias=qkv_bias, time_scale=time_scale, freq_dim=freq_dim,
        )  # fmt: skip
        self.in_channels = self.out_channels = in_channels
        self.image_size, self.patch_size, self.grid = (h, w), patch_size, (h // patch_size, w // patch_size)
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.text_dim, self.pooled_dim, self.max_text_tokens = text_dim, pooled_dim, max_text_tokens
        self.conditions = self.config["conditions"]
        self.num_classes = num_classes

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, *self.grid)[None], persistent=False)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_dim=freq_dim, time_scale=time_scale)
        self.context_embedder = nn.Linear(text_dim, hidden_size)
        self.null_context = nn.Parameter(torch.zeros(hidden_size))
        self.pooled_embedder = self.null_pooled = None
        if pooled_dim is not None:
            self.pooled_embedder = nn.Sequential(
                nn.Linear(pooled_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
            self.null_pooled = nn.Parameter(torch.zeros(hidden_size))
        self.label_embedder = MultiClassEmbedder(self.conditions, hidden_size) if self.conditions else None
        self.blocks = nn.ModuleList(
            JointBlock(hidden_size, num_heads, mlp_ratio, qkv_bias, context_pre_only=i == depth - 1)
            for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """All initialisation in one place (as in DiT/SiT).

        Linear layers (context embedding, q/k/v, projections, MLPs): Xavier-uniform weights, zero bias.
        Patch embedding: Xavier-uniform on the conv weight viewed as (D, C·p·p). Time and pooled MLPs, label
        tables, the null context token and null pooled embedding: N(0, 0.02²). adaLN modulation of both
        streams of every block and of the final layer, and the final linear: zero (adaLN-Zero).
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        wx = self.x_embedder.weight
        nn.init.xavier_uniform_(wx.view(wx.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        small = [self.t_embedder.mlp[0].weight, self.t_embedder.mlp[2].weight, self.null_context]
        if self.pooled_embedder is not None and self.null_pooled is not None:
            small += [self.pooled_embedder[0].weight, self.pooled_embedder[2].weight, self.null_pooled]
        if self.label_embedder is not None:
            small += [t.table.weight for t in self.label_embedder.tables.values()]
        for p in small:
            nn.init.normal_(p, std=0.02)
        zero = [self.final_layer.linear, self.final_layer.adaLN_modulation[-1]]
        for block in self.blocks:
            zero += [block.ctx_stream.adaLN_modulation[-1], block.x_stream.adaLN_modulation[-1]]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _split_cond(self, cond: object, batch: int) -> tuple[TextCond, MultiCond | None]:
        """The text part and the class-like parts of ``cond``, checked against this model."""
        if isinstance(cond, TextCond):
            text, labels = cond, {}
        elif isinstance(cond, MultiCond):
            texts = [n for n, p in cond.parts.items() if isinstance(p, TextCond)]
            if len(texts) != 1:
                raise ValueError(f"an MMDiT needs exactly one text (TextCond) part in a MultiCond, got {len(texts)} "
                                 f"({', '.join(texts) or 'none'})")
            text = cond[texts[0]]
            labels = {n: p for n, p in cond.parts.items() if n != texts[0]}
        else:
            kind = "class ids (a tensor)" if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"a prompt/class mismatch: this MMDiT is conditioned on text (a TextCond, or a "
                             f"MultiCond with one TextCond part), got {kind}")
        assert isinstance(text, TextCond)
        if len(text) != batch:
            raise ValueError(f"the condition has {len(text)} rows but x has {batch}")
        if text.token_dim != self.text_dim:
            raise ValueError(f"mismatched feature widths: the text tokens are {text.token_dim} wide but this "
                             f"model was built with text_dim={self.text_dim}")
        if self.pooled_dim is not None and text.pooled_dim != self.pooled_dim:
            raise ValueError(f"mismatched feature widths: the pooled text vector is {text.pooled_dim} wide but this "
                             f"model was built with pooled_dim={self.pooled_dim}")
        n_tok = text.tokens.shape[1]
        if not 1 <= n_tok <= self.max_text_tokens:
            raise ValueError(f"the text is padded to {n_tok} tokens; this model takes 1 to {self.max_text_tokens} "
                             f"(max_text_tokens)")
        if labels and self.conditions is None:
            raise ValueError(f"this MMDiT has no class-like conditions, but the condition also holds {sorted(labels)}")
        if self.conditions and not labels:
            raise ValueError(f"this MMDiT is also conditioned on {sorted(self.conditions)}: pass a MultiCond with "
                             f"those Labels parts and one TextCond part")
        return text, (MultiCond(labels) if labels else None)

    def _embed_text(self, text: TextCond, n_image: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(context tokens (B, L, D), key mask (B, L + N), pooled embedding (B, D) or None); null rows get the
        learned null token (first slot, the rest masked) and the learned null pooled embedding."""
        null = text.null[:, None]  # (B, 1)
        first = torch.zeros_like(text.mask[:1])
        first[:, 0] = True  # (1, L)
        read = text.mask & ~null  # the token features that are used
        w = self.context_embedder.weight
        ctx = self.context_embedder(text.tokens.to(w.dtype).masked_fill(~read[..., None], 0.0))
        ctx = torch.where((null & first)[..., None], self.null_context.to(ctx.dtype), ctx)
        key_mask = torch.cat([torch.where(null, first, text.mask), read.new_ones(read.shape[0], n_image)], dim=1)
        if self.pooled_embedder is None or self.null_pooled is None:
            return ctx, key_mask, None
        pooled = self.pooled_embedder(text.pooled.to(w.dtype).masked_fill(null, 0.0))
        return ctx, key_mask, torch.where(null, self.null_pooled.to(pooled.dtype), pooled)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: TextCond | MultiCond,
        return_features: Sequence[int] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Velocity v(x, t, cond) of shape (B, C, H, W).

        ``return_features``: 0-based block indices i; the image tokens (B, N, D) output by block i are
        returned too, in the order asked, as ``(velocity, features)`` (REPA's ``encoder_depth = k`` is
        index ``k − 1``).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.image_size:
            raise ValueError(f"expected input (B, {self.in_channels}, {self.image_size[0]}, {self.image_size[1]}), "
                             f"got {tuple(x.shape)}")
        want = [int(i) for i in return_features] if return_features is not None else []
        bad = [i for i in want if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"return_features indices must lie in [0, {self.depth - 1}], got {bad}")
        text, labels = self._split_cond(cond, x.shape[0])
        t = check_time(t, x.shape[0], x.device)
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        ctx, key_mask, pooled = self._embed_text(text, h.shape[1])
        c = self.t_embedder(t)
        if pooled is not None:
            c = c + pooled
        if labels is not None and self.label_embedder is not None:
            c = c + self.label_embedder(labels)
        feats: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            ctx_next, h = block(ctx, h, c, key_mask)
            ctx = ctx_next if ctx_next is not None else ctx
            if i in want:
                feats[i] = h
        out = _unpatchify(self.final_layer(h, c), self.patch_size, self.grid, self.out_channels)
        return out if return_features is None else (out, [feats[i] for i in want])

    def num_parameters(self) -> int:
        """Number of trainable parameters (the position code is a fixed buffer)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_sample(self, text_len: int | None = None) -> int:
        """Forward FLOPs for one sample with a text padded to ``text_len`` tokens (default
        ``max_text_tokens``): matmuls, convs and attention, 2·m·n·k each, counted on the meta device.

        With L text and N image tokens, each of the first depth − 1 blocks costs about
        24·(L + N)·D² + 4·(L + N)²·D; the last 24·N·D² + 4·L·D² + 4·N·(L + N)·D. Training ≈ 3× this.
        """
        n_tok = self.max_text_tokens if text_len is None else int(text_len)
        with torch.device("meta"):
            twin = MMDiT(**self.config)
            x = torch.zeros(1, self.in_channels, *self.image_size)
            t = torch.zeros(1)
            text = TextCond(torch.zeros(1, n_tok, self.text_dim), torch.ones(1, n_tok, dtype=torch.bool),
                            torch.zeros(1, self.pooled_dim or 1), torch.zeros(1, dtype=torch.bool))
            cond: TextCond | MultiCond = text
            if self.conditions:
                parts: dict[str, Labels | TextCond] = {
                    k: Labels(torch.zeros(1, dtype=torch.long), n) for k, n in self.conditions.items()}
                name = "text"
                while name in parts:
                    name += "_"
                parts[name] = text
                cond = MultiCond(parts)
        return count_forward_flops(lambda: twin(x, t, cond))
