"""Key maps and weight transforms from public SiT checkpoints to deltafm's :class:`~deltafm.models.sit.SiT`.

Three source layouts (all the DiT/SiT architecture, timm blocks, adaLN-Zero):

``sit``
    willisma/SiT ``models.py``: ``learn_sigma=True`` (the final linear emits 2C channels per pixel, the
    first C are the velocity), linear path with x_t = t·x1 + (1 − t)·x0, so t = 0 is noise as here:
    no change of time.
``repa``
    sihyun-yu/REPA ``models/sit.py``: C output channels, extra ``projectors.*`` (the REPA MLP heads, not
    needed to sample), time reversed: x_t = (1 − t_ref)·x + t_ref·ε, target u_ref = ε − x = −u.
    ``decoder_blocks.i`` (REPA's legacy layout) is block ``encoder_depth + i``.
``deltafm-ref``
    gstoica27/DeltaFM ``models/sit.py``: the REPA model unchanged (same keys, same time convention).

Key map (source -> deltafm)::

    x_embedder.proj.{weight,bias}          -> x_embedder.{weight,bias}
    y_embedder.embedding_table.weight      -> y_embedder.table.weight
    t_embedder.mlp.{0,2}.*, blocks.i.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1}.*,
    final_layer.{linear, adaLN_modulation.1}.*                      -> same names
    pos_embed (fixed sin-cos, stored)      -> not stored here (a fixed buffer); used to find the
                                              channel order below
    projectors.*                           -> dropped (returned as extras)

Weight transforms, each exact (the converted model computes the same function up to fp32 rounding):

* **Position-code channel order.** The reference codes put the column (x) code in the first half of the
  hidden channels and the row (y) code in the second; ours does the opposite. The stored ``pos_embed``
  says which order a checkpoint uses; when it is the other one, every weight that reads or writes the
  residual stream is permuted by the half swap (LayerNorms without affine are permutation-equivariant).
* **Time reversal** (repa, deltafm-ref): the sinusoidal features of 1 − t are a fixed linear map of those
  of t (per frequency ω: cos ω(1−t) = cos ω·cos ωt + sin ω·sin ωt, sin ω(1−t) = sin ω·cos ωt − cos ω·sin ωt),
  folded into ``t_embedder.mlp.0.weight``.
* **Velocity sign** (repa, deltafm-ref): the final linear layer is negated, so
  ``ours(x, t, y) = −ref(x, 1 − t, y)``.
* **learn_sigma** (sit): the final linear keeps only the rows of the first C output channels.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .reader import ConvertError

__all__ = ["LAYOUTS", "Architecture", "Converted", "convert_state_dict", "infer_architecture", "reference_pos_embed"]

#: source layout -> (reversed time and sign, has learn_sigma channels, may hold REPA projectors)
LAYOUTS: dict[str, dict[str, bool]] = {
    "sit": dict(reverse_time=False, learn_sigma=True, projectors=False),
    "repa": dict(reverse_time=True, learn_sigma=False, projectors=True),
    "deltafm-ref": dict(reverse_time=True, learn_sigma=False, projectors=True),
}

_BLOCK_PARAMS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
_TOP_PARAMS = ("t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.linear", "final_layer.adaLN_modulation.1")
_BLOCK_RE = re.compile(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)$")
_STRIP_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class Architecture:
    """The SiT hyper-parameters read from a state dict's shapes."""

    in_channels: int
    out_channels: int
    image_size: int
    patch_size: int
    hidden_size: int
    depth: int
    mlp_ratio: float
    freq_dim: int
    table_rows: int


@dataclass
class Converted:
    """deltafm state dict, the dropped extras (REPA projectors) and what was done."""

    state_dict: dict[str, Tensor]
    arch: Architecture
    extras: dict[str, Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _strip_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    for pre in _STRIP_PREFIXES:
        if sd and all(k.startswith(pre) for k in sd):
            sd = {k[len(pre):]: v for k, v in sd.items()}
    return sd


def _unlegacy(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], bool]:
    """REPA's legacy layout: ``decoder_blocks.i`` is block ``encoder_depth + i`` (encoder_depth = the
    number of ``blocks.*``)."""
    idx = {int(m.group(2)) for k in sd if (m := _BLOCK_RE.match(k)) and m.group(1) == "blocks"}
    if not any(k.startswith("decoder_blocks.") for k in sd):
        return sd, False
    enc = len(idx)
    out = {}
    for k, v in sd.items():
        m = _BLOCK_RE.match(k)
        if m and m.group(1) == "decoder_blocks":
            k = f"blocks.{enc + int(m.group(2))}.{m.group(3)}"
        out[k] = v
    return out, True


def _expected_keys(depth: int) -> set[str]:
    keys = {"x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight", "pos_embed"}
    keys |= {f"{p}.{s}" for p in _TOP_PARAMS for s in ("weight", "bias")}
    keys |= {f"blocks.{i}.{p}.{s}" for i in range(depth) for p in _BLOCK_PARAMS for s in ("weight", "bias")}
    return keys


def _check_keys(sd: dict[str, Tensor], layout: str, depth: int) -> None:
    expected = _expected_keys(depth)
    allowed_extra = (lambda k: k.startswith("projectors.")) if LAYOUTS[layout]["projectors"] else (lambda k: False)
    unexpected = sorted(k for k in sd if k not in expected and not allowed_extra(k))
    missing = sorted(expected - set(sd) - {"pos_embed"})
    if unexpected or missing:
        parts = []
        if unexpected:
            hint = ""
            if any(k.startswith("projectors.") for k in unexpected):
                hint = " (REPA projectors: use --from repa or deltafm-ref)"
            elif any(".q_norm." in k or ".k_norm." in k for k in unexpected):
                hint = " (qk_norm attention is not supported by deltafm's SiT)"
            parts.append(f"unexpected keys {_short(unexpected)}{hint}")
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        raise ConvertError(f"the weights do not match the {layout!r} SiT layout: " + "; ".join(parts))


def _short(keys: list[str], n: int = 8) -> str:
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return "[" + ", ".join(keys[:n]) + "]" + more


def infer_architecture(sd: dict[str, Tensor], layout: str) -> Architecture:
    """Read the architecture from the shapes (the head count is not in them: see the CLI's --model)."""
    try:
        w = sd["x_embedder.proj.weight"]
        hidden, c, p, p2 = (int(s) for s in w.shape)
    except (KeyError, ValueError):
        raise ConvertError("no patch embedding 'x_embedder.proj.weight' of shape (D, C, p, p): "
                           f"not a {layout!r} SiT checkpoint (keys start with {_short(sorted(sd), 5)})") from None
    if p != p2:
        raise ConvertError(f"non-square patches {p}x{p2} are not supported")
    idx = {int(m.group(2)) for k in sd if (m := _BLOCK_RE.match(k))}
    depth = len(idx)
    if depth == 0 or idx != set(range(depth)):
        raise ConvertError(f"expected blocks.0 ... blocks.N-1, found block indices {sorted(idx)}")
    _check_keys(sd, layout, depth)
    out = int(sd["final_layer.linear.weight"].shape[0])
    if out % (p * p):
        raise ConvertError(f"final_layer.linear has {out} outputs, not a multiple of p*p = {p * p}")
    out_c = out // (p * p)
    allowed = (c, 2 * c) if LAYOUTS[layout]["learn_sigma"] else (c,)
    if out_c not in allowed:
        raise ConvertError(f"final layer emits {out_c} channels for {c} input channels; the {layout!r} layout "
                           f"emits {' or '.join(map(str, allowed))} (learn_sigma checkpoints are --from sit)")
    if "pos_embed" in sd:
        n = int(sd["pos_embed"].shape[-2])
    else:
        raise ConvertError("no 'pos_embed' in the weights: cannot tell the latent size or the position-code "
                           "channel order")
    side = math.isqrt(n)
    if side * side != n:
        raise ConvertError(f"pos_embed has {n} tokens, not a square grid")
    fc1 = sd["blocks.0.mlp.fc1.weight"]
    return Architecture(
        in_channels=c, out_channels=out_c, image_size=side * p, patch_size=p, hidden_size=hidden, depth=depth,
        mlp_ratio=int(fc1.shape[0]) / hidden, freq_dim=int(sd["t_embedder.mlp.0.weight"].shape[1]),
        table_rows=int(sd["y_embedder.embedding_table.weight"].shape[0]),
    )


def reference_pos_embed(dim: int, grid: int) -> Tensor:
    """The reference codes' fixed 2-D sin-cos code (grid·grid, dim): column code first, then row code.

    Written from the definition (per axis: [sin(pos·ω_i), cos(pos·ω_i)], ω_i = 10000^(−2i/(dim/2)))."""
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def axis(pos: Tensor) -> Tensor:
        a = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)

    return torch.cat([axis(cols), axis(rows)], dim=1).float()


def _channel_order(sd: dict[str, Tensor], arch: Architecture) -> Tensor | None:
    """None when the stored pos_embed is ours; the half-swap permutation when it is the reference's."""
    from deltafm.models.sit import sincos_pos_embed_2d

    stored = sd["pos_embed"].reshape(-1, arch.hidden_size).float()
    grid = arch.image_size // arch.patch_size
    ours = sincos_pos_embed_2d(arch.hidden_size, grid, grid)
    d = arch.hidden_size
    perm = torch.cat([torch.arange(d // 2, d), torch.arange(0, d // 2)])
    if torch.allclose(stored, ours, atol=1e-4):
        return None
    if torch.allclose(stored, ours[:, perm], atol=1e-4):
        return perm
    raise ConvertError("the stored pos_embed is neither the reference sin-cos code nor deltafm's: a learned "
                       "position embedding cannot be represented by deltafm's SiT")


def _permute_stream(sd: dict[str, Tensor], perm: Tensor, depth: int) -> None:
    """Reorder the residual-stream channels by ``perm`` (new channel i = old channel perm[i])."""
    d = perm.numel()

    def rows(k: str, chunks: int = 1) -> None:
        idx = torch.cat([perm + j * d for j in range(chunks)])
        sd[k] = sd[k][idx]

    rows("x_embedder.weight")
    rows("x_embedder.bias")
    for i in range(depth):
        b = f"blocks.{i}"
        sd[f"{b}.attn.qkv.weight"] = sd[f"{b}.attn.qkv.weight"][:, perm]
        sd[f"{b}.mlp.fc1.weight"] = sd[f"{b}.mlp.fc1.weight"][:, perm]
        for k in ("attn.proj", "mlp.fc2"):
            rows(f"{b}.{k}.weight")
            rows(f"{b}.{k}.bias")
        rows(f"{b}.adaLN_modulation.1.weight", 6)
        rows(f"{b}.adaLN_modulation.1.bias", 6)
    rows("final_layer.adaLN_modulation.1.weight", 2)
    rows("final_layer.adaLN_modulation.1.bias", 2)
    sd["final_layer.linear.weight"] = sd["final_layer.linear.weight"][:, perm]


def time_reversal_matrix(freq_dim: int) -> Tensor:
    """R with sinusoidal(1 − t) = R · sinusoidal(t) for the [cos(ω t), sin(ω t)] features (float64)."""
    half = freq_dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half).double()
    c, s = torch.diag(torch.cos(freqs)), torch.diag(torch.sin(freqs))
    r = torch.zeros(freq_dim, freq_dim, dtype=torch.float64)
    r[:half, :half], r[:half, half:2 * half] = c, s
    r[half:2 * half, :half], r[half:2 * half, half:2 * half] = s, -c
    return r  # an odd freq_dim's zero column stays zero


def convert_state_dict(source: dict[str, Tensor], layout: str) -> Converted:
    """Map a source state dict (one of :data:`LAYOUTS`) to deltafm SiT weights (``learn_sigma=False``)."""
    if layout not in LAYOUTS:
        raise ConvertError(f"unknown source layout {layout!r}; known: {', '.join(LAYOUTS)}")
    sd, legacy = _unlegacy(_strip_prefix(dict(source)))
    arch = infer_architecture(sd, layout)
    notes = ["decoder_blocks.i renamed to blocks.(encoder_depth + i) (legacy REPA layout)"] if legacy else []
    extras = {k: v for k, v in sd.items() if k.startswith("projectors.")}
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k in ("pos_embed",) or k in extras:
            continue
        k = k.replace("x_embedder.proj.", "x_embedder.").replace("y_embedder.embedding_table.", "y_embedder.table.")
        out[k] = v.detach().float().clone()
    c, p = arch.in_channels, arch.patch_size
    if arch.out_channels == 2 * c:  # learn_sigma: keep the first C of each pixel's 2C outputs
        keep = torch.arange(p * p * 2 * c).reshape(p * p, 2 * c)[:, :c].reshape(-1)
        out["final_layer.linear.weight"] = out["final_layer.linear.weight"][keep]
        out["final_layer.linear.bias"] = out["final_layer.linear.bias"][keep]
        notes.append(f"learn_sigma: dropped the last {c} of {2 * c} output channels of final_layer.linear")
    perm = _channel_order(sd, arch)
    if perm is not None:
        _permute_stream(out, perm, arch.depth)
        notes.append("position code: hidden channels half-swapped (reference column-first order -> deltafm row-first)")
    if LAYOUTS[layout]["reverse_time"]:
        w = out["t_embedder.mlp.0.weight"].double()
        out["t_embedder.mlp.0.weight"] = (w @ time_reversal_matrix(arch.freq_dim)).float()
        out["final_layer.linear.weight"] = -out["final_layer.linear.weight"]
        out["final_layer.linear.bias"] = -out["final_layer.linear.bias"]
        notes.append("time reversed (t_ref = 1 - t folded into t_embedder.mlp.0) and velocity negated (u = -u_ref)")
    if extras:
        notes.append(f"dropped {len(extras)} REPA projector tensors (kept in a side file)")
    return Converted(out, arch, extras, notes)
