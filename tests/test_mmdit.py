"""Tests for the MMDiT text-to-image backbone (joint attention, null text, padding mask, REPA features)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from deltafm.alignment import AlignedModel
from deltafm.conditioning import Labels, MultiCond, TextCond
from deltafm.models import build_model, list_models, model_preset
from deltafm.models.mmdit import JointBlock, MMDiT, _unpatchify, mmdit_size

C, S, P, TD, PD = 2, 8, 2, 12, 10  # channels, image side, patch, text width, pooled width
N = (S // P) ** 2  # image tokens


def _tiny(**kw) -> MMDiT:
    cfg = dict(in_channels=C, image_size=S, patch_size=P, depth=3, hidden_size=32, num_heads=4,
               text_dim=TD, pooled_dim=PD)
    cfg.update(kw)
    return MMDiT(**cfg)


def _perturb(model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Add N(0, std²) to every parameter so no zero-initialised branch stays zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _text(b: int, length: int, lengths: list[int], null: list[bool] | None = None, seed: int = 0,
          dim: int = TD, pooled: int = PD) -> TextCond:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    null_t = torch.tensor(null if null is not None else [False] * b)
    return TextCond(torch.randn(b, length, dim, generator=g), mask, torch.randn(b, pooled, generator=g), null_t)


def _xt(b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, C, S, S, generator=g), torch.rand(b, generator=g)


def _replace(text: TextCond, **fields: torch.Tensor) -> TextCond:
    parts = dict(tokens=text.tokens, mask=text.mask, pooled=text.pooled, null=text.null)
    parts.update(fields)
    return TextCond(**parts)


# ----------------------------------------------------------------------------- the joint block by hand


def _ln(h: torch.Tensor) -> torch.Tensor:
    mu = h.mean(-1, keepdim=True)
    var = ((h - mu) ** 2).mean(-1, keepdim=True)
    return (h - mu) / torch.sqrt(var + 1e-6)


def _lin(h: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return h @ layer.weight.T + layer.bias


def _gelu_tanh(u: torch.Tensor) -> torch.Tensor:
    return 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))


def _hand_stream_in(stream: nn.Module, h: torch.Tensor, c: torch.Tensor, n_mods: int, n_proj: int):
    """Modulation chunks and the q/k/v (or k/v) matrices of one stream, with plain tensor ops."""
    d = h.shape[-1]
    mods = _lin(c * torch.sigmoid(c), stream.adaLN_modulation[1])
    mods = [mods[:, i * d:(i + 1) * d] for i in range(n_mods)]
    hm = _ln(h) * (1 + mods[1][:, None]) + mods[0][:, None]
    proj = _lin(hm, stream.qkv)
    return mods, [proj[..., i * d:(i + 1) * d] for i in range(n_proj)]


def _hand_stream_out(stream: nn.Module, h: torch.Tensor, a: torch.Tensor, mods: list[torch.Tensor]) -> torch.Tensor:
    h = h + mods[2][:, None] * _lin(a, stream.proj)
    hm = _ln(h) * (1 + mods[4][:, None]) + mods[3][:, None]
    return h + mods[5][:, None] * _lin(_gelu_tanh(_lin(hm, stream.mlp.fc1)), stream.mlp.fc2)


def _hand_block(blk: JointBlock, ctx, x, c, ctx_mask):
    """One joint block: explicit matmuls per head, softmax over [context; x] keys with −∞ on padded keys."""
    pre_only = blk.ctx_stream.pre_only
    mc, ctx_p = _hand_stream_in(blk.ctx_stream, ctx, c, 2 if pre_only else 6, 2 if pre_only else 3)
    mx, (qx, kx, vx) = _hand_stream_in(blk.x_stream, x, c, 6, 3)
    kc, vc = ctx_p[-2:]
    q = qx if pre_only else torch.cat([ctx_p[0], qx], 1)
    k, v = torch.cat([kc, kx], 1), torch.cat([vc, vx], 1)
    keep = torch.cat([ctx_mask, torch.ones(x.shape[0], x.shape[1], dtype=torch.bool)], 1)
    heads, d = blk.num_heads, x.shape[-1]
    dh = d // heads
    out = []
    for i in range(heads):
        sl = slice(i * dh, (i + 1) * dh)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(dh)
        logits = logits.masked_fill(~keep[:, None, :], float("-inf"))
        out.append(torch.softmax(logits, dim=-1) @ v[..., sl])
    a = torch.cat(out, -1)
    n_ctx = 0 if pre_only else ctx.shape[1]
    x_new = _hand_stream_out(blk.x_stream, x, a[:, n_ctx:], mx)
    return (None if pre_only else _hand_stream_out(blk.ctx_stream, ctx, a[:, :n_ctx], mc)), x_new


# fp64: the fused SDPA kernel sums logits, softmax and values in another order than the hand version,
# so the two agree to rounding only: ~1e-16·(terms) in fp64, ~1e-7·(terms) in fp32; a wrong formula is O(1) off.
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("pre_only", [False, True])
def test_joint_block_matches_hand_computation(pre_only: bool, dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(0)
    blk = JointBlock(32, 4, mlp_ratio=4.0, context_pre_only=pre_only)
    _perturb(blk, std=0.2)  # non-zero modulation and gates
    blk = blk.to(dtype)
    g = torch.Generator().manual_seed(3)
    b, length = 3, 5
    ctx = torch.randn(b, length, 32, generator=g, dtype=dtype)
    x = torch.randn(b, N, 32, generator=g, dtype=dtype)
    c = torch.randn(b, 32, generator=g, dtype=dtype)
    ctx_mask = torch.arange(length)[None, :] < torch.tensor([5, 2, 1])[:, None]
    key_mask = torch.cat([ctx_mask, torch.ones(b, N, dtype=torch.bool)], 1)
    with torch.no_grad():
        ctx_out, x_out = blk(ctx, x, c, key_mask)
        ctx_ref, x_ref = _hand_block(blk, ctx, x, c, ctx_mask)
    torch.testing.assert_close(x_out, x_ref, rtol=tol, atol=tol)
    if pre_only:
        assert ctx_out is None and ctx_ref is None
        assert not hasattr(blk.ctx_stream, "proj") and blk.ctx_stream.qkv.out_features == 2 * 32
    else:
        torch.testing.assert_close(ctx_out, ctx_ref, rtol=tol, atol=tol)
    # the mask acts: without it the padded context keys would change the image tokens
    with torch.no_grad():
        _, x_unmasked = blk(ctx, x, c, torch.ones_like(key_mask))
    assert (x_unmasked - x_out).abs().max() > 1e-3


# ----------------------------------------------------------------------------- initialisation


def test_fresh_model_outputs_exactly_zero_and_blocks_keep_the_image_tokens() -> None:
    model = _tiny()
    x, t = _xt(2)
    text = _text(2, 4, [4, 2], null=[False, True])
    out, feats = model(x, t, text, return_features=[0, 1, 2])
    assert torch.equal(out, torch.zeros_like(x))
    h0 = model.x_embedder(x).flatten(2).transpose(1, 2) + model.pos_embed
    assert all(torch.equal(f, h0) for f in feats)
    for block in model.blocks:
        for stream in (block.ctx_stream, block.x_stream):
            assert torch.count_nonzero(stream.adaLN_modulation[-1].weight) == 0
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    assert torch.count_nonzero(model.context_embedder.weight) > 0


# ----------------------------------------------------------------------------- padding and null text


def test_padded_tokens_do_not_affect_the_output_bit_for_bit() -> None:
    torch.manual_seed(0)
    model = _tiny()
    _perturb(model)
    x, t = _xt(3)
    text = _text(3, 6, [3, 6, 1])
    out = model(x, t, text)
    tokens = text.tokens.clone()
    pad = ~text.mask
    tokens[pad] = torch.randn(int(pad.sum()), TD) * 100
    tokens[0, 5, 0] = float("nan")
    # padded positions are zeroed before the context embedding, so the whole computation is identical
    assert torch.equal(model(x, t, _replace(text, tokens=tokens)), out)
    real = text.tokens.clone()
    real[0, 1] += 1.0  # a real token of row 0 does matter, to row 0 only
    moved = model(x, t, _replace(text, tokens=real))
    assert (moved[0] - out[0]).abs().max() > 1e-4
    assert torch.equal(moved[1:], out[1:])
    # padding takes no part at all: row 0 (3 real tokens) padded to 6 = the same text padded to 3; equal to
    # fp32 rounding only, since a different key count changes the kernels' summation order
    short = TextCond(text.tokens[:1, :3], text.mask[:1, :3], text.pooled[:1], text.null[:1])
    torch.testing.assert_close(model(x[:1], t[:1], short), out[:1], rtol=1e-5, atol=1e-6)


def test_null_rows_ignore_their_features_and_use_the_learned_null() -> None:
    torch.manual_seed(0)
    model = _tiny()
    _perturb(model)
    x, t = _xt(3)
    text = _text(3, 5, [5, 3, 2], null=[False, True, False])
    out = model(x, t, text)
    g = torch.Generator().manual_seed(9)
    tokens, pooled = text.tokens.clone(), text.pooled.clone()
    tokens[1] = torch.randn(5, TD, generator=g) * 10
    tokens[1, 0, 0] = float("nan")
    pooled[1] = float("nan")
    mask = text.mask.clone()
    mask[1] = torch.tensor([True, False, True, True, False])
    other = model(x, t, _replace(text, tokens=tokens, pooled=pooled, mask=mask))
    assert torch.equal(other, out)
    # the same row not null does depend on its text, and differs from the null output
    cond = model(x, t, _replace(text, null=torch.zeros(3, dtype=torch.bool)))
    assert (cond[1] - out[1]).abs().max() > 1e-4
    assert torch.equal(cond[[0, 2]], out[[0, 2]])
    # the null is learned: changing the null token and null pooled vector moves the null row only
    with torch.no_grad():
        model.null_context.add_(0.5)
        model.null_pooled.add_(0.5)
    moved = model(x, t, text)
    assert (moved[1] - out[1]).abs().max() > 1e-4
    assert torch.equal(moved[[0, 2]], out[[0, 2]])


def test_without_a_pooled_vector_the_pooled_input_is_ignored() -> None:
    torch.manual_seed(0)
    model = _tiny(pooled_dim=None)
    assert model.pooled_embedder is None and model.null_pooled is None
    _perturb(model)
    x, t = _xt(2)
    text = _text(2, 4, [4, 3], pooled=7)
    out = model(x, t, text)
    assert torch.equal(model(x, t, _replace(text, pooled=torch.randn(2, 3))), out)


# ----------------------------------------------------------------------------- batch rows


def test_each_row_depends_only_on_its_own_inputs() -> None:
    torch.manual_seed(0)
    model = _tiny()
    _perturb(model)
    x, t = _xt(4)
    text = _text(4, 5, [5, 2, 3, 4], null=[False, False, True, False])
    out = model(x, t, text)
    # change everything about row 3: rows 0-2 are bit-identical (same shapes, same kernels)
    x2, t2 = x.clone(), t.clone()
    x2[3], t2[3] = torch.randn(C, S, S), 0.9
    tokens, mask = text.tokens.clone(), text.mask.clone()
    tokens[3], mask[3, 1:] = torch.randn(5, TD), False
    other = model(x2, t2, _replace(text, tokens=tokens, mask=mask, null=torch.tensor([False, False, True, True])))
    assert torch.equal(other[:3], out[:3])
    assert (other[3] - out[3]).abs().max() > 1e-4
    # a permuted batch gives the permuted outputs (to rounding: row blocking of the matmuls may change)
    perm = torch.tensor([2, 0, 3, 1])
    permuted = model(x[perm], t[perm], TextCond(text.tokens[perm], text.mask[perm], text.pooled[perm],
                                                 text.null[perm]))
    torch.testing.assert_close(permuted, out[perm], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- multi-condition


def _forward_with_c(model: MMDiT, x: torch.Tensor, text: TextCond, c: torch.Tensor) -> torch.Tensor:
    """The model's token pipeline with a given conditioning vector c."""
    ctx, key_mask, _ = model._embed_text(text, N)
    h = model.x_embedder(x).flatten(2).transpose(1, 2) + model.pos_embed
    for block in model.blocks:
        ctx, h = block(ctx, h, c, key_mask)
    return _unpatchify(model.final_layer(h, c), P, model.grid, C)


def test_named_labels_add_to_the_conditioning_vector() -> None:
    torch.manual_seed(0)
    model = _tiny(conditions={"style": 3, "size": 2})
    _perturb(model)
    x, t = _xt(2)
    text = _text(2, 4, [4, 2])
    style, size = Labels(torch.tensor([0, 3]), 3), Labels(torch.tensor([1, 2]), 2)
    out = model(x, t, MultiCond({"caption": text, "style": style, "size": size}))
    # c = t_emb + pooled_emb + Table_style[ids] + Table_size[ids]  (the part order of the MultiCond is free)
    tables = model.label_embedder.tables
    _, _, pooled = model._embed_text(text, N)
    c = model.t_embedder(t) + pooled + tables["style"].table.weight[[0, 3]] + tables["size"].table.weight[[1, 2]]
    torch.testing.assert_close(_forward_with_c(model, x, text, c), out, rtol=1e-6, atol=1e-6)
    changed = model(x, t, MultiCond({"size": size, "style": Labels(torch.tensor([1, 3]), 3), "caption": text}))
    assert (changed[0] - out[0]).abs().max() > 1e-4
    assert torch.equal(changed[1], out[1])  # part order is free: tables are summed in the model's order


# ----------------------------------------------------------------------------- REPA features


def test_return_features_are_the_image_tokens_after_each_block() -> None:
    torch.manual_seed(0)
    model = _tiny(depth=4)
    _perturb(model)
    x, t = _xt(2)
    text = _text(2, 5, [5, 3], null=[False, True])
    plain = model(x, t, text)
    out, feats = model(x, t, text, return_features=[3, 1])
    assert torch.equal(out, plain)
    assert [f.shape for f in feats] == [(2, N, 32)] * 2
    ctx, key_mask, pooled = model._embed_text(text, N)
    h = model.x_embedder(x).flatten(2).transpose(1, 2) + model.pos_embed
    c = model.t_embedder(t) + pooled
    for i, block in enumerate(model.blocks):
        ctx, h = block(ctx, h, c, key_mask)
        if i == 1:
            assert torch.equal(feats[1], h)
    assert ctx is None  # the last block's context stream is pre-only
    assert torch.equal(feats[0], h)
    with pytest.raises(ValueError, match=r"\[0, 3\].*\[4\]"):
        model(x, t, text, return_features=[4])


def test_aligned_model_wraps_an_mmdit() -> None:
    torch.manual_seed(0)
    backbone = _tiny(depth=4)
    _perturb(backbone)
    model = AlignedModel(backbone, z_dims=[16, 8], encoder_depth=2, projector_dim=24)
    x, t = _xt(2)
    text = _text(2, 5, [5, 3])
    assert torch.equal(model(x, t, text), backbone(x, t, text))
    v, projected = model(x, t, text, align=True)
    _, (h,) = backbone(x, t, text, return_features=[1])
    assert torch.equal(v, backbone(x, t, text))
    assert [p.shape for p in projected] == [(2, N, 16), (2, N, 8)]
    assert torch.equal(projected[0], model.projectors[0](h))
    assert model.grid == (S // P, S // P)


# ----------------------------------------------------------------------------- gradients


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = _tiny(conditions={"style": 3})
    _perturb(model)
    x, t = _xt(3)
    text = _text(3, 5, [5, 2, 3], null=[False, True, False])
    cond = MultiCond({"text": text, "style": Labels(torch.tensor([0, 3, 2]), 3)})
    model(x, t, cond).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []


def test_bf16_autocast_forward_and_backward() -> None:
    torch.manual_seed(0)
    model = _tiny()
    _perturb(model)
    x, t = _xt(2)
    text = _text(2, 5, [5, 3], null=[False, True])
    ref = model(x, t, text)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, text)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (out.float() - ref).norm() / ref.norm() < 0.1  # bf16 rounding; a wrong graph would be O(1) off
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------- errors


def test_errors_say_what_is_wrong() -> None:
    model = _tiny(max_text_tokens=6)
    x, t = _xt(2)
    text = _text(2, 4, [4, 2])
    with pytest.raises(ValueError, match=r"expected input \(B, 2, 8, 8\), got \(2, 3, 8, 8\)"):
        model(torch.zeros(2, 3, 8, 8), t, text)
    with pytest.raises(ValueError, match="prompt/class mismatch.*class ids"):
        model(x, t, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt/class mismatch.*Labels"):
        model(x, t, Labels(torch.zeros(2, dtype=torch.long), 3))
    with pytest.raises(ValueError, match="mismatched feature widths.*tokens are 7 wide.*text_dim=12"):
        model(x, t, _text(2, 4, [4, 2], dim=7))
    with pytest.raises(ValueError, match="mismatched feature widths.*pooled.*3 wide.*pooled_dim=10"):
        model(x, t, _text(2, 4, [4, 2], pooled=3))
    with pytest.raises(ValueError, match="padded to 7 tokens.*1 to 6"):
        model(x, t, _text(2, 7, [7, 2]))
    with pytest.raises(ValueError, match="3 rows but x has 2"):
        model(x, t, _text(3, 4, [4, 2, 1]))
    with pytest.raises(ValueError, match="exactly one text.*got 2"):
        model(x, t, MultiCond({"a": text, "b": text}))
    with pytest.raises(ValueError, match=r"no class-like conditions.*\['style'\]"):
        model(x, t, MultiCond({"a": text, "style": Labels(torch.zeros(2, dtype=torch.long), 3)}))
    labelled = _tiny(conditions={"style": 3})
    with pytest.raises(ValueError, match=r"also conditioned on \['style'\]"):
        labelled(x, t, text)
    with pytest.raises(ValueError, match="'style' must be Labels with 3 values, got Labels with 4"):
        labelled(x, t, MultiCond({"a": text, "style": Labels(torch.zeros(2, dtype=torch.long), 4)}))
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 3\]"):
        labelled(x, t, MultiCond({"a": text, "style": Labels(torch.tensor([0, 5]), 3)}))
    with pytest.raises(ValueError, match=r"12x12 is not divisible by the patch size 5"):
        _tiny(image_size=12, patch_size=5)
    with pytest.raises(ValueError, match="hidden size 36 is not divisible by num_heads 8"):
        _tiny(hidden_size=36, num_heads=8)


# ----------------------------------------------------------------------------- sizes, FLOPs, registry


def _hand_params(depth: int, d: int, c: int, p: int, td: int, pd: int | None, freq: int = 256,
                 tables: tuple[int, ...] = ()) -> int:
    stream = (6 * d * d + 6 * d) + (3 * d * d + 3 * d) + (d * d + d) + (8 * d * d + 5 * d)
    last_ctx = (2 * d * d + 2 * d) + (2 * d * d + 2 * d)
    n = (depth - 1) * 2 * stream + stream + last_ctx
    n += c * p * p * d + d + freq * d + d + d * d + d + td * d + d + d  # patches, time MLP, context, null token
    n += (pd * d + d + d * d + d + d) if pd is not None else 0  # pooled MLP and null pooled
    n += sum((k + 1) * d for k in tables)
    return n + (2 * d * d + 2 * d) + (d * p * p * c + p * p * c)  # final adaLN and linear


def _hand_flops(depth: int, d: int, n: int, length: int, c: int, p: int, td: int, pd: int | None,
                freq: int = 256) -> int:
    per_token = 2 * d * (3 * d + d + 8 * d)  # qkv, output projection, MLP
    total = (depth - 1) * ((length + n) * per_token + 2 * 2 * d * 6 * d + 4 * (length + n) ** 2 * d)
    total += n * per_token + 2 * length * d * 2 * d + 2 * d * 6 * d + 2 * d * 2 * d + 4 * n * (length + n) * d
    total += 2 * n * c * p * p * d + 2 * length * td * d + 2 * (freq * d + d * d)
    total += 2 * (pd * d + d * d) if pd is not None else 0
    return total + 2 * d * 2 * d + 2 * n * d * p * p * c


@pytest.mark.parametrize("pooled", [PD, None])
def test_parameter_count_and_flops_match_hand_formulas(pooled: int | None) -> None:
    model = _tiny(pooled_dim=pooled, conditions={"style": 3})
    assert model.num_parameters() == _hand_params(3, 32, C, P, TD, pooled, tables=(3,))
    assert model.flops_per_sample(5) == _hand_flops(3, 32, N, 5, C, P, TD, pooled)
    assert model.flops_per_sample() == _hand_flops(3, 32, N, 77, C, P, TD, pooled)


def test_sizing_rule_defaults() -> None:
    assert mmdit_size(24) == (768, 24)
    with torch.device("meta"):
        model = MMDiT(depth=6, text_dim=8, pooled_dim=None)
    assert (model.hidden_size, model.num_heads) == (192, 6)
    assert model.blocks[0].num_heads == 6 and model.config["hidden_size"] == 192


def test_registry_presets_build_and_report_size() -> None:
    names = [n for n in list_models() if n.startswith("MMDiT-")]
    for name in ("MMDiT-N/2", "MMDiT-T/2", "MMDiT-d12/2", "MMDiT-d24/2", "MMDiT-d24/4"):
        assert name in names
    for name in names:
        _, kw = model_preset(name)
        if "-d" in name:
            assert (kw["hidden_size"], kw["num_heads"]) == mmdit_size(kw["depth"])
        assert kw["hidden_size"] // kw["num_heads"] == 32
    with torch.device("meta"):
        big = build_model("MMDiT-d24/2", in_channels=4, image_size=32, num_classes=0, text_dim=768, pooled_dim=None)
    assert big.num_parameters() == _hand_params(24, 768, 4, 2, 768, None)
    model = build_model("mmdit-n/2", in_channels=4, image_size=32, num_classes=0, text_dim=384, pooled_dim=384)
    assert isinstance(model, MMDiT) and (model.depth, model.hidden_size, model.num_heads) == (4, 128, 4)
    assert model.num_parameters() == _hand_params(4, 128, 4, 2, 384, 384)
    assert model.flops_per_sample(16) == _hand_flops(4, 128, 256, 16, 4, 2, 384, 384)
    with pytest.raises(TypeError, match="text_dim"):
        build_model("MMDiT-N/2", in_channels=4, image_size=32, num_classes=0)


# ----------------------------------------------------------------------------- rebuild from config


def test_state_dict_round_trip_through_the_config() -> None:
    torch.manual_seed(0)
    model = _tiny(conditions={"style": 3})
    _perturb(model)
    config = json.loads(json.dumps(model.config))  # as a checkpoint's JSON/YAML would hold it
    twin = MMDiT(**config)
    assert twin.config == model.config
    twin.load_state_dict(model.state_dict())
    x, t = _xt(2)
    cond = MultiCond({"text": _text(2, 4, [4, 1], null=[True, False]), "style": Labels(torch.tensor([2, 3]), 3)})
    assert torch.equal(twin(x, t, cond), model(x, t, cond))
    assert "pos_embed" not in model.state_dict()  # a fixed code, rebuilt from the config
