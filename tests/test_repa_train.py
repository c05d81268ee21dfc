"""REPA in training runs: logged parts, resume bit-exactness, REPA off leaves the backbone's training
unchanged, sampling a REPA checkpoint, clear errors, and a 2-process torchrun run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltafm.train.builders import SetupError
from deltafm.train.checkpoint import list_checkpoints, load_checkpoint
from deltafm.train.config import find_preset, load_config
from deltafm.train.loop import train
from deltafm.train.restore import load_for_sampling

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
FAST = ["log.progress_bar=false", "log.tensorboard=false", "train.threads=1", "log.every=1", "sample.every=-1",
        "model.name=SiT-N/2", "train.batch_size=32", "optim.lr=1e-3"]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised DINOv2 (patch 2): 8×8 digits at the SiT-N/2 grid 4×4 need no resize."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       patch_size=2, image_size=8)
    folder = tmp_path_factory.mktemp("enc") / "tiny-dino"
    Dinov2Model(cfg).save_pretrained(folder)
    return folder


def _cfg(encoder_dir: Path | None, *overrides: str):
    repa = [f"repa.encoders=[{encoder_dir}]", "repa.encoder_depth=2", "repa.projector_dim=32"] if encoder_dir else []
    return load_config(find_preset("digits-tiny"), [*FAST, *repa, *overrides])


def _train(cfg, out, resume=None):
    with torch.random.fork_rng(devices=[]):
        return train(cfg, out, resume=resume)


def _records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_repa_run_logs_its_part_resumes_bit_exactly_and_samples(encoder_dir, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    _train(_cfg(encoder_dir, "train.steps=6", "train.ckpt_every=3"), whole)
    recs = _records(whole)
    assert all("repa" in r for r in recs) and -1.0 <= recs[-1]["repa"] <= 1.0
    # loss = ΔFM part + 0.5 · REPA part, per step
    for r in recs:
        assert r["loss"] == pytest.approx(r["positive"] - 0.05 * r["negative"] + 0.5 * r["repa"], rel=1e-5, abs=1e-6)
    _train(_cfg(encoder_dir, "train.steps=3", "train.ckpt_every=3"), split)
    _train(_cfg(encoder_dir, "train.steps=6", "train.ckpt_every=3"), split, resume="auto")
    a = load_checkpoint(list_checkpoints(whole / "checkpoints")[-1])
    b = load_checkpoint(list_checkpoints(split / "checkpoints")[-1])
    assert any(k.startswith("projectors.") for k in a.model)
    for part in ("model", "ema"):
        wa, wb = getattr(a, part), getattr(b, part)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    loaded = load_for_sampling(whole)
    x = torch.randn(2, 1, 8, 8)
    v = loaded.model(x, torch.rand(2), torch.tensor([1, 2]))
    assert v.shape == x.shape and loaded.data.align_dims == [16]


def test_repa_off_and_coefficient_zero_train_the_backbone_identically(encoder_dir, tmp_path):
    """Same data order, draws, losses and backbone updates. Gradient clipping is off here: its global norm
    over more parameters (the projectors' zero gradients) is summed in another order (last-bit changes)."""
    off, zero = tmp_path / "off", tmp_path / "zero"
    _train(_cfg(None, "train.steps=4", "optim.grad_clip=null"), off)
    _train(_cfg(encoder_dir, "train.steps=4", "repa.proj_coeff=0.0", "optim.grad_clip=null"), zero)
    a = load_checkpoint(list_checkpoints(off / "checkpoints")[-1]).model
    b = load_checkpoint(list_checkpoints(zero / "checkpoints")[-1]).model
    backbone = {k.removeprefix("backbone."): v for k, v in b.items() if k.startswith("backbone.")}
    assert backbone.keys() == a.keys() and all(torch.equal(a[k], backbone[k]) for k in a)
    assert [r["loss"] for r in _records(off)] == [r["loss"] for r in _records(zero)]


def test_bad_repa_settings_are_clear_errors(encoder_dir, tmp_path):
    with pytest.raises(SetupError, match="SiT"):
        _train(_cfg(encoder_dir, "train.steps=1", "model.name=unet-t"), tmp_path / "a")
    with pytest.raises(SetupError, match="prepare-latents --encoder"):
        _train(_cfg(None, "train.steps=1", "repa.features=[dino]"), tmp_path / "b")
    with pytest.raises(SetupError, match="no such folder"):
        _train(_cfg(None, "train.steps=1", f"repa.encoders=[{tmp_path / 'nothing'}]"), tmp_path / "c")
    with pytest.raises(SetupError, match="encoder_depth"):
        _train(_cfg(encoder_dir, "train.steps=1", "repa.encoder_depth=9"), tmp_path / "d")
    assert not any((tmp_path / n).exists() and any((tmp_path / n).iterdir()) for n in "abcd")


def test_torchrun_two_processes_with_repa(encoder_dir, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "deltafm",
           "train", "--preset", "digits-tiny", *FAST, f"repa.encoders=[{encoder_dir}]", "repa.encoder_depth=2",
           "repa.projector_dim=32", "train.steps=3", "--out", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _records(out)
    assert [r["step"] for r in recs] == [1, 2, 3] and all("repa" in r for r in recs)
    w = load_checkpoint(list_checkpoints(out / "checkpoints")[-1]).model
    assert any(k.startswith("projectors.") for k in w)


# ----------------------------------------------------------------------------------------- latent shards

from test_repa_data import make_parts  # noqa: E402  (shards made with the real prepare-latents)


@pytest.fixture(scope="module")
def latent_parts(tmp_path_factory) -> dict[str, Path]:
    return make_parts(tmp_path_factory.mktemp("repa-latent"))

LATENT = ["data.name=latents", "model.name=SiT-N/2", "train.batch_size=8", "train.steps=2", "repa.encoder_depth=2",
          "repa.projector_dim=16", "objective.label_dropout=0.0"]


def _latent_cfg(root: Path, *overrides: str):
    base = [o for o in FAST if not o.startswith(("model.name", "train.batch_size"))]
    return load_config(find_preset("digits-tiny"), [*base, *LATENT, f"data.root={root}", *overrides])


def test_latent_runs_align_to_stored_tokens_or_to_the_encoder_on_stored_images(latent_parts, tmp_path):
    parts = latent_parts
    from deltafm.data import LatentStore
    from deltafm.train.repa import RepaTargets

    store = LatentStore(parts["extras"])
    stored = RepaTargets.from_config(_latent_cfg(parts["extras"], "repa.features=[dino]").repa, store, True,
                                     torch.device("cpu"))
    live = RepaTargets.from_config(_latent_cfg(parts["extras"], f"repa.encoders=[{parts['dino']}]").repa, store,
                                   True, torch.device("cpu"))
    assert stored.extra_names == ("features.dino",) and live.extra_names == ("images",)
    assert stored.dims == live.dims == [32]
    idx = torch.tensor([3, 0, 7])
    extras = store.load_extras(idx, ["features.dino", "images"])
    x = store.load_batch(idx)
    a, b = stored(x, extras, (4, 4))[0], live(x, extras, (4, 4))[0]
    assert torch.equal(a, extras["features.dino"])
    torch.testing.assert_close(b, a, atol=2e-3, rtol=2e-3)  # stored tokens are float16
    # grid mismatch: stored 4x4 tokens resampled to the model's grid
    assert stored(x, extras, (2, 2))[0].shape == (3, 4, 32)
    for name, extra in (("feat", "repa.features=[dino]"), ("live", f"repa.encoders=[{parts['dino']}]")):
        res = _train(_latent_cfg(parts["extras"], extra), tmp_path / name)
        assert res.status == "done" and all("repa" in r for r in _records(tmp_path / name))
    with pytest.raises(SetupError, match="--keep-images"):
        _train(_latent_cfg(parts["plain"], f"repa.encoders=[{parts['dino']}]"), tmp_path / "plain")


def test_a_python_encoder_spec_plugs_any_module_into_a_run(tmp_path, monkeypatch):
    """repa.encoders=[python:MODULE:FUNCTION]: the user's network (here a stride-2 conv on 8x8 digits)."""
    from deltafm.encoders import EncoderError, load_encoder

    (tmp_path / "my_encoders.py").write_text(
        "import torch\nfrom deltafm.encoders import ModuleEncoder\n\n"
        "class Patches(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        torch.manual_seed(0)\n        self.conv = torch.nn.Conv2d(3, 12, 2, 2)\n\n"
        "    def forward(self, x):\n        return self.conv(x).flatten(2).transpose(1, 2)\n\n"
        "def make():\n    return ModuleEncoder(Patches(), 'patches', 12, patch_size=2)\n\n"
        "def wrong():\n    return torch.nn.Identity()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    enc = load_encoder("python:my_encoders:make")
    assert enc.name == "patches" and enc(torch.zeros(2, 1, 8, 8), grid=(4, 4)).shape == (2, 16, 12)
    with pytest.raises(EncoderError, match="not an ImageEncoder"):
        load_encoder("python:my_encoders:wrong")
    with pytest.raises(EncoderError, match="cannot import"):
        load_encoder("python:my_encoders:nothing")
    res = _train(load_config(find_preset("digits-tiny"), [*FAST, "repa.encoders=[python:my_encoders:make]",
                                                          "repa.encoder_depth=2", "repa.projector_dim=16",
                                                          "train.steps=2"]), tmp_path / "run")
    assert res.status == "done" and all("repa" in r for r in _records(tmp_path / "run"))
