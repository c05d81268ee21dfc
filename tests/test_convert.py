"""``deltafm convert``: reference-layout checkpoints written here, converted, and checked against an
independent functional forward of the reference architecture (written below from the reference key names),
with the time convention applied: ours(x, t, y) = −ref(x, 1 − t, y) for REPA / ΔFM-reference weights,
ours(x, t, y) = ref(x, t, y)[:, :C] for SiT (learn_sigma) weights."""

from __future__ import annotations

import argparse
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deltafm import safe_load
from deltafm.cli import main as deltafm_main
from deltafm.convert import cli as convert_cli
from deltafm.convert import reader
from deltafm.convert.layouts import time_reversal_matrix
from deltafm.train.restore import load_for_sampling

C, SIDE, P, D, DEPTH, HEADS, K = 4, 8, 2, 64, 2, 4, 10


# ----------------------------------------------------------------------------- the reference, from its key names


def ref_pos_embed(dim: int, grid: int) -> np.ndarray:
    """The reference's fixed code: meshgrid(w, h) (w first), first half of the channels from grid[0]."""
    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)), axis=0)

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(dim // 2, g[0]), one(dim // 2, g[1])], axis=1)


def reference_sd(layout: str, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.1):
        return torch.randn(*shape, generator=gen) * std

    out_c = 2 * C if layout == "sit" else C
    sd = {"x_embedder.proj.weight": r(D, C, P, P, std=0.3), "x_embedder.proj.bias": r(D),
          "pos_embed": torch.from_numpy(ref_pos_embed(D, SIDE // P)).float()[None],
          "t_embedder.mlp.0.weight": r(D, 256, std=0.1), "t_embedder.mlp.0.bias": r(D),
          "t_embedder.mlp.2.weight": r(D, D), "t_embedder.mlp.2.bias": r(D),
          "y_embedder.embedding_table.weight": r(K + 1, D, std=0.3)}
    for i in range(DEPTH):
        b = f"blocks.{i}"
        sd.update({f"{b}.attn.qkv.weight": r(3 * D, D, std=0.15), f"{b}.attn.qkv.bias": r(3 * D),
                   f"{b}.attn.proj.weight": r(D, D), f"{b}.attn.proj.bias": r(D),
                   f"{b}.mlp.fc1.weight": r(4 * D, D), f"{b}.mlp.fc1.bias": r(4 * D),
                   f"{b}.mlp.fc2.weight": r(D, 4 * D), f"{b}.mlp.fc2.bias": r(D),
                   f"{b}.adaLN_modulation.1.weight": r(6 * D, D), f"{b}.adaLN_modulation.1.bias": r(6 * D)})
    sd.update({"final_layer.linear.weight": r(P * P * out_c, D, std=0.2), "final_layer.linear.bias": r(P * P * out_c),
               "final_layer.adaLN_modulation.1.weight": r(2 * D, D), "final_layer.adaLN_modulation.1.bias": r(2 * D)})
    if layout != "sit":
        for j, (o, i) in enumerate([(32, D), (32, 32), (16, 32)]):
            sd[f"projectors.0.{2 * j}.weight"], sd[f"projectors.0.{2 * j}.bias"] = r(o, i), r(o)
    return sd


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def ref_forward(sd, x, t, y, learn_sigma=False):
    """Functional DiT/SiT forward in the reference's own time and output channels."""
    b = x.shape[0]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=P).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    tf = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    temb = F.linear(F.silu(F.linear(tf, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    for i in range(DEPTH):
        pre = f"blocks.{i}."
        m = F.linear(F.silu(c), sd[pre + "adaLN_modulation.1.weight"], sd[pre + "adaLN_modulation.1.bias"])
        s1, c1, g1, s2, c2, g2 = (z[:, None] for z in m.chunk(6, dim=-1))
        a = _ln(h) * (1 + c1) + s1
        qkv = F.linear(a, sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, -1, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // HEADS), dim=-1) @ v
        att = att.transpose(1, 2).reshape(b, -1, D)
        h = h + g1 * F.linear(att, sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"])
        a = _ln(h) * (1 + c2) + s2
        mlp = F.linear(F.gelu(F.linear(a, sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"]), approximate="tanh"),
                       sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])
        h = h + g2 * mlp
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=-1)
    out = F.linear(_ln(h) * (1 + scale[:, None]) + shift[:, None], sd["final_layer.linear.weight"],
                   sd["final_layer.linear.bias"])
    co = out.shape[-1] // (P * P)
    g = SIDE // P
    img = torch.einsum("nhwpqc->nchpwq", out.reshape(b, g, g, P, P, co)).reshape(b, co, SIDE, SIDE)
    return img[:, :C] if learn_sigma else img


# ----------------------------------------------------------------------------- helpers


def write_reference(path, layout, *, bare=False, args=None, legacy=False):
    ema, model = reference_sd(layout, 0), reference_sd(layout, 1)
    if legacy:  # REPA's old layout: blocks.1 -> decoder_blocks.0 (encoder_depth 1)
        ema = {k.replace("blocks.1.", "decoder_blocks.0."): v for k, v in ema.items()}
    if bare:
        torch.save(ema, path)
    else:
        ns = args if args is not None else argparse.Namespace(model="SiT-B/2", batch_size=256, cfg_prob=0.1,
                                                              path_type="linear", loss_type="mean")
        torch.save({"model": model, "ema": ema, "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
                    "args": ns, "steps": 7}, path)
    return reference_sd(layout, 0), model


def convert(tmp_path, layout, *extra, name="ref.pt", **kw):
    src = tmp_path / name
    ema, model = write_reference(src, layout, **kw)
    out = tmp_path / f"out-{layout}"
    rc = convert_cli.main(["--from", layout, "--ckpt", str(src), "--out", str(out), "--num-heads", str(HEADS), *extra])
    assert rc == 0
    return out, ema, model


def inputs(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, SIDE, SIDE, generator=g)
    t = torch.rand(n, generator=g)
    y = torch.tensor([0, 3, 9, K, 5, K])[:n]
    return x, t, y


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("layout", ["sit", "repa", "deltafm-ref"])
def test_converted_model_matches_the_reference_forward(tmp_path, layout):
    out, ema, _ = convert(tmp_path, layout)
    lm = load_for_sampling(out)
    assert lm.ema and lm.step == 7 and lm.shape == (C, SIDE, SIDE) and lm.data.num_classes == K
    x, t, y = inputs()
    with torch.no_grad():
        ours = lm.model(x, t, y)
        if layout == "sit":
            want = ref_forward(ema, x, t, y, learn_sigma=True)
        else:
            want = -ref_forward(ema, x, 1 - t, y)
    assert want.abs().mean() > 0.1  # a non-trivial function
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=2e-5)
    if layout != "sit":
        assert (out / "reference_projectors.safetensors").is_file()


def test_model_weights_and_a_bare_state_dict(tmp_path):
    out, _, model = convert(tmp_path, "repa", "--weights", "model")
    lm = load_for_sampling(out)
    assert not lm.ema
    x, t, y = inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(x, t, y), -ref_forward(model, x, 1 - t, y), rtol=1e-4, atol=2e-5)
    out, ema, _ = convert(tmp_path, "sit", name="bare.pt", bare=True)
    lm = load_for_sampling(out)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(x, t, y), ref_forward(ema, x, t, y, learn_sigma=True), rtol=1e-4, atol=2e-5)


def test_legacy_repa_layout(tmp_path):
    out, ema, _ = convert(tmp_path, "repa", legacy=True)
    x, t, y = inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(load_for_sampling(out).model(x, t, y), -ref_forward(ema, x, 1 - t, y),
                                   rtol=1e-4, atol=2e-5)


def test_time_reversal_matrix_maps_the_features_of_t_to_those_of_1_minus_t():
    t = torch.rand(5, dtype=torch.float64)
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128).double()

    def feats(s):
        return torch.cat([torch.cos(s[:, None] * freqs), torch.sin(s[:, None] * freqs)], dim=1)

    torch.testing.assert_close(feats(t) @ time_reversal_matrix(256).T, feats(1 - t))


def test_interference_vector_becomes_the_mean_target(tmp_path):
    vec = torch.randn(C, SIDE, SIDE, generator=torch.Generator().manual_seed(5))
    torch.save(vec, tmp_path / "iv.pt")
    ns = argparse.Namespace(loss_type="contrastive", contrastive_weight=0.05, cfg_prob=0.1, batch_size=256)
    out, ema, _ = convert(tmp_path, "deltafm-ref", "--interference", str(tmp_path / "iv.pt"), args=ns)
    lm = load_for_sampling(out)
    assert lm.lam == pytest.approx(0.05)
    assert lm.config.sample.bias_correction == "guidance" and tuple(lm.config.sample.interval) == (0.35, 1.0)
    corr = lm.correction("to_fm")
    x, t, y = inputs(3)
    with torch.no_grad():
        ours = corr(lm.model(x, t, y), t, y)
        # the reference sampler: v_ref <- 0.95 v_ref - 0.05 I at t_ref = 1 - t; our velocity is -v_ref
        want = -(0.95 * ref_forward(ema, x, 1 - t, y) - 0.05 * vec)
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=2e-5)


# ----------------------------------------------------------------------------- refusals


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_pickle_with_code_is_refused_without_running_it(tmp_path, capsys, how):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(str(proof)))).close()
    assert proof.exists()  # unpickling this payload does run code
    marker = tmp_path / "marker"
    src = tmp_path / "evil.pt"
    obj = {"ema": {"x_embedder.proj.weight": torch.zeros(1)}, "args": _Payload(str(marker))}
    if how == "torch.save":
        torch.save(obj, src)
    else:
        src.write_bytes(pickle.dumps(obj, protocol=2))
    rc = deltafm_main(["convert", "--from", "repa", "--ckpt", str(src), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "refusing" in err
    assert not marker.exists()


def test_unknown_keys_are_named(tmp_path, capsys):
    sd = reference_sd("repa")
    sd["foo.weight"] = torch.zeros(3)
    torch.save({"ema": sd}, tmp_path / "x.pt")
    rc = convert_cli.main(["--from", "repa", "--ckpt", str(tmp_path / "x.pt"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "unexpected keys [foo.weight]" in err
    rc = convert_cli.main(["--from", "sit", "--ckpt", str(tmp_path / "x.pt"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "projectors" in err and "--from repa" in err
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_other_bad_inputs(tmp_path, capsys, monkeypatch):
    write_reference(tmp_path / "r.pt", "repa")
    base = ["--from", "repa", "--ckpt", str(tmp_path / "r.pt"), "--out", str(tmp_path / "o")]
    assert convert_cli.main(base) == 2  # a size that is no preset needs the head count
    assert "--num-heads" in capsys.readouterr().err
    assert convert_cli.main([*base, "--num-heads", "4", "--image-size", "16"]) == 2
    assert "--image-size 16" in capsys.readouterr().err
    assert convert_cli.main([*base, "--num-heads", "4", "--num-classes", "3"]) == 2
    assert "--num-classes 3" in capsys.readouterr().err
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    garbage = ["--from", "sit", "--ckpt", str(tmp_path / "garbage.pt"), "--out", str(tmp_path / "o")]
    assert convert_cli.main(garbage) == 2
    assert capsys.readouterr().err.startswith("error:")
    (tmp_path / "garbage.pt").write_bytes(b"hello world")  # bytes that made torch.load raise a bare KeyError
    assert convert_cli.main(garbage) == 2
    assert capsys.readouterr().err.startswith("error:")
    monkeypatch.setattr(safe_load, "torch_version", lambda: (2, 5))
    assert convert_cli.main([*base, "--num-heads", "4"]) == 2
    assert "torch >= 2.6" in capsys.readouterr().err


def test_public_sizes_map_to_the_presets():
    from deltafm.convert.layouts import Architecture

    xl = Architecture(in_channels=4, out_channels=8, image_size=32, patch_size=2, hidden_size=1152, depth=28,
                      mlp_ratio=4.0, freq_dim=256, table_rows=1001)
    assert convert_cli.model_spec(xl, None, None) == ("SiT-XL/2", {})
    b4 = Architecture(4, 4, 64, 4, 768, 12, 4.0, 256, 1001)
    assert convert_cli.model_spec(b4, "sit-b/4", None) == ("SiT-B/4", {})
    with pytest.raises(reader.ConvertError, match="not SiT-B/2"):
        convert_cli.model_spec(xl, "SiT-B/2", None)


def test_a_vae_given_to_convert_is_recorded_and_decodes_the_samples(tmp_path):
    """``convert --vae DIR`` records the VAE's folder and identity, so ``deltafm sample`` writes decoded
    images (the identity check of deltafm.vae.decoding applies); a folder that is not a VAE is an error."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    from deltafm.vae import load_autoencoder

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=C, norm_num_groups=4).save_pretrained(tmp_path / "vae")
    out, _, _ = convert(tmp_path, "sit", "--vae", str(tmp_path / "vae"))
    lm = load_for_sampling(out)
    ae = load_autoencoder(tmp_path / "vae")
    assert (lm.data.vae_source, lm.data.vae_identity) == (ae.source, ae.identity)
    rc = deltafm_main(["sample", "--ckpt", str(out), "--num", "2", "--steps", "2", "--no-progress", "--threads", "1",
                       "--out", str(tmp_path / "s")])
    assert rc == 0
    with np.load(tmp_path / "s" / "samples.npz") as z:
        assert z["arr_0"].shape == (2, 2 * SIDE, 2 * SIDE, 3) and z["arr_0"].dtype == np.uint8
    src = tmp_path / "ref.pt"
    assert convert_cli.main(["--from", "sit", "--ckpt", str(src), "--out", str(tmp_path / "o2"), "--num-heads",
                             str(HEADS), "--vae", str(tmp_path)]) == 2
