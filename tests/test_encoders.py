"""deltafm.encoders: REPA's preprocessing and patch tokens of a transformers DINOv2 loaded from its folder,
checked against a hand computation; registers dropped; the folder's mean/std used; identity; frozen;
ModuleEncoder's grid resampling; and the errors a user meets (no folder, no config, another model, no
weights, hub ids, bad grids and images)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")

from deltafm.alignment import match_token_grid  # noqa: E402
from deltafm.encoders import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderError,
    ImageEncoder,
    ModuleEncoder,
    load_encoder,
)

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=4, image_size=28)


def _save(folder: Path, seed: int = 0, registers: int | None = None, **cfg) -> Path:
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(seed)
    if registers is None:
        model = Dinov2Model(Dinov2Config(**{**TINY, **cfg}))
    else:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**{**TINY, **cfg}, num_register_tokens=registers))
    model.save_pretrained(folder)
    return folder


def _reference(folder: Path, images: torch.Tensor, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
               prefix: int = 1) -> torch.Tensor:
    """The hand computation: [0, 1], gray -> RGB, normalise, bicubic (unless already that size), model."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    x = (images + 1) / 2
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state[:, prefix:]


def _images(c: int = 1, side: int = 28, n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, c, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_tokens_equal_the_hand_computation_at_the_native_and_a_smaller_grid(tmp_path):
    folder = _save(tmp_path / "tiny dino!")
    enc = load_encoder(folder)
    assert isinstance(enc, ImageEncoder)
    assert (enc.name, enc.embed_dim, enc.patch_size, enc.resolution) == ("tiny-dino", 32, 4, None)
    x = _images()
    native = enc(x, grid=(7, 7))  # 28 px already: no resize
    assert native.shape == (3, 49, 32) and native.dtype == torch.float32 and not native.requires_grad
    assert torch.allclose(native, _reference(folder, x, 28), atol=1e-6, rtol=0)
    small = enc(x, grid=(4, 4))  # bicubic to 16 px
    assert small.shape == (3, 16, 32)
    assert torch.allclose(small, _reference(folder, x, 16), atol=1e-6, rtol=0)
    rgb = _images(c=3, side=20)
    assert torch.allclose(enc(rgb, (5, 5)), _reference(folder, rgb, 20), atol=1e-6, rtol=0)
    assert enc(x[:1], (2, 3)).shape == (1, 6, 32)  # rectangular grids: 8 x 12 px


def test_registers_are_dropped(tmp_path):
    folder = _save(tmp_path / "reg", registers=4)
    enc = load_encoder(folder)
    x = _images()
    tokens = enc(x, (7, 7))
    assert tokens.shape == (3, 49, 32)
    assert torch.allclose(tokens, _reference(folder, x, 28, prefix=5), atol=1e-6, rtol=0)


def test_the_folders_mean_and_std_are_used(tmp_path):
    folder = _save(tmp_path / "enc")
    mean, std = [0.25, 0.5, 0.75], [0.5, 0.25, 0.125]
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std,
                                                                 "crop_size": {"height": 224, "width": 224}}))
    enc = load_encoder(folder)
    assert enc.image_mean == tuple(mean) and enc.image_std == tuple(std)  # exact in float32
    x = _images(c=3)
    assert torch.allclose(enc(x, (7, 7)), _reference(folder, x, 28, mean, std), atol=1e-6, rtol=0)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5], "image_std": std}))
    with pytest.raises(EncoderError, match="image mean must be 3 finite numbers"):
        load_encoder(folder)


def test_identity_follows_the_content(tmp_path):
    a = load_encoder(_save(tmp_path / "a"))
    assert a.identity.startswith("Dinov2Model:") and len(a.identity.split(":")[1]) == 16
    assert load_encoder(_save(tmp_path / "b")).identity == a.identity  # same content, other folder
    assert load_encoder(_save(tmp_path / "c", seed=1)).identity != a.identity
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tmp_path / "a")
    with torch.no_grad():
        model.layernorm.weight[0] += 1e-3
    model.save_pretrained(tmp_path / "d")
    assert load_encoder(tmp_path / "d").identity != a.identity
    (tmp_path / "a" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3}))
    assert load_encoder(tmp_path / "a").identity != a.identity  # the normalisation changes the tokens


def test_a_half_precision_folder_loads_in_float32(tmp_path):
    from transformers import AutoModel

    AutoModel.from_pretrained(_save(tmp_path / "a")).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    enc = load_encoder(tmp_path / "bf16")
    assert {p.dtype for p in enc.parameters()} == {torch.float32}
    assert enc(_images(), (7, 7)).dtype == torch.float32


def test_the_encoder_is_frozen(tmp_path):
    enc = load_encoder(_save(tmp_path / "enc"))
    assert not enc.training and all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    x = _images().requires_grad_(True)
    assert not enc(x, (7, 7)).requires_grad
    assert set(enc.state_dict()) == {f"model.{k}" for k in enc.model.state_dict()}  # mean/std are not saved


def test_module_encoder_resamples_a_fixed_size_grid():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)  # 32 px -> 8 x 8 tokens

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(x).flatten(2).transpose(1, 2)

    enc = ModuleEncoder(Tokens(), "conv/enc", 8, mean=(0.5,) * 3, std=(0.25,) * 3, resolution=32)
    assert enc.name == "conv-enc" and enc.patch_size is None and enc.resolution == (32, 32)
    x = _images(side=20)
    tokens = enc(x, (5, 5))
    v = ((x + 1) / 2).repeat(1, 3, 1, 1)
    v = F.interpolate((v - 0.5) / 0.25, size=(32, 32), mode="bicubic", align_corners=False)
    with torch.no_grad():
        ref = match_token_grid(conv(v).flatten(2).transpose(1, 2), (5, 5))
    assert tokens.shape == (3, 25, 8) and torch.allclose(tokens, ref, atol=1e-6, rtol=0)
    assert torch.allclose(enc(x, (8, 8)), match_token_grid(conv(v).flatten(2).transpose(1, 2), (8, 8)).detach())
    same = ModuleEncoder(Tokens(), "conv/enc", 8, mean=(0.5,) * 3, std=(0.25,) * 3, resolution=32)
    assert same.identity == enc.identity
    assert ModuleEncoder(Tokens(), "other", 8, mean=(0.5,) * 3, std=(0.25,) * 3, resolution=32).identity != enc.identity
    patch = ModuleEncoder(Tokens(), "patch", 8, patch_size=4)
    assert patch(x, (3, 3)).shape == (3, 9, 8)


def test_module_encoder_output_is_checked():
    flat = ModuleEncoder(nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.Flatten()), "flat", 8, patch_size=4)
    with pytest.raises(EncoderError, match=r"returned \(2, 128\); expected tokens \(2, N, 8\)"):
        flat(_images(n=2, side=16), (4, 4))

    class Wide(nn.Module):
        def forward(self, x):
            return x.flatten(2).transpose(1, 2)  # 3 wide, one token per pixel

    with pytest.raises(EncoderError, match=r"expected tokens \(2, N, 8\)"):
        ModuleEncoder(Wide(), "wide", 8, patch_size=1)(_images(n=2, side=4), (4, 4))
    with pytest.raises(EncoderError, match="16 tokens for a 2x2 grid"):
        ModuleEncoder(Wide(), "wide", 3, patch_size=2)(_images(n=2, side=4), (2, 2))
    with pytest.raises(EncoderError, match="exactly one of patch_size"):
        ModuleEncoder(Wide(), "wide", 3)


def test_folders_that_are_not_an_encoder_are_named(tmp_path):
    with pytest.raises(EncoderError, match="no such folder"):
        load_encoder(tmp_path / "missing")
    with pytest.raises(EncoderError, match="hub ids are not downloaded.*save_pretrained"):
        load_encoder("facebook/dinov2-base")
    with pytest.raises(EncoderError, match="no config.json"):
        load_encoder(tmp_path)
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(EncoderError, match="model_type is 'vit', expected one of 'dinov2'"):
        load_encoder(tmp_path / "vit")
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                         vocab_size=10)).save_pretrained(tmp_path / "bert")
    with pytest.raises(EncoderError, match="model_type is 'bert'"):
        load_encoder(tmp_path / "bert")
    folder = _save(tmp_path / "enc")
    (folder / "model.safetensors").unlink()
    with pytest.raises(EncoderError, match="config.json but no weights"):
        load_encoder(folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EncoderError, match="cannot load the Dinov2Model weights"):
        load_encoder(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(EncoderError, match="not readable JSON"):
        load_encoder(folder)
    (tmp_path / "file").write_text("x")
    with pytest.raises(EncoderError, match="is a file, not a folder"):
        load_encoder(tmp_path / "file")


def test_bad_grids_and_images_are_errors(tmp_path):
    enc = load_encoder(_save(tmp_path / "enc"))
    x = _images()
    for grid in [(0, 7), (7, -1)]:
        with pytest.raises(EncoderError, match="positive sides"):
            enc(x, grid)
    with pytest.raises(EncoderError, match=r"\(B, C, H, W\)"):
        enc(x[0], (7, 7))
    with pytest.raises(EncoderError, match="1 or 3 channels"):
        enc(torch.zeros(1, 2, 28, 28), (7, 7))
    with pytest.raises(EncoderError, match="must be float"):
        enc(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), (7, 7))


def test_transformers_is_imported_only_when_a_folder_is_loaded():
    import subprocess
    import sys

    code = "import sys, deltafm.encoders; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
